#!/usr/bin/env python3
"""Read ansible-playbook's JSON callback output (ANSIBLE_STDOUT_CALLBACK=json).

  recap.py FILE summary        per host: counts, changed tasks, seconds
  recap.py FILE changed HOST   names of the tasks that changed on HOST, one a line
  recap.py FILE touched        hosts that any task ran on (skipped or not)
  recap.py FILE seconds HOST   wall time of HOST's batch: first task start to last task end
  recap.py FILE diff HOST      the diffs reported for HOST, unified
  recap.py FILE stat HOST KEY  a PLAY RECAP counter (ok, changed, failures, rescued, ...)
"""
import datetime
import difflib
import json
import sys


def load(path):
    text = open(path, encoding="utf-8").read()
    # Warnings may precede the document.
    return json.loads(text[text.index("{"):])


def when(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def results(doc, host):
    for play in doc["plays"]:
        for t in play["tasks"]:
            r = t["hosts"].get(host)
            if r is not None:
                yield t, r


def name(t):
    # Role tasks are named "ROLE : TASK".
    return t["task"]["name"].split(" : ", 1)[-1]


def changed(doc, host):
    return [name(t) for t, r in results(doc, host) if r.get("changed") and not r.get("skipped")]


def seconds(doc, host):
    spans = [(when(t["task"]["duration"]["start"]), when(t["task"]["duration"]["end"]))
             for t, r in results(doc, host) if "end" in t["task"].get("duration", {})]
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def diffs(doc, host):
    out = []
    for t, r in results(doc, host):
        d = r.get("diff")
        for one in d if isinstance(d, list) else [d] if d else []:
            if "before" not in one and "after" not in one:
                continue
            before, after = str(one.get("before", "")), str(one.get("after", ""))
            if before == after:
                continue
            out.append("--- %s: %s" % (name(t), one.get("before_header", "")))
            out.extend(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", lineterm="", n=1))
    return out


def main():
    doc = load(sys.argv[1])
    what = sys.argv[2]
    if what == "summary":
        for host, s in sorted(doc["stats"].items()):
            print("%s: ok=%d changed=%d failed=%d rescued=%d skipped=%d, %.1f s; changed: %s" % (
                host, s.get("ok", 0), s.get("changed", 0), s.get("failures", 0), s.get("rescued", 0),
                s.get("skipped", 0), seconds(doc, host), ", ".join(changed(doc, host)) or "-"))
    elif what == "changed":
        print("\n".join(changed(doc, sys.argv[3])))
    elif what == "touched":
        hosts = {h for p in doc["plays"] for t in p["tasks"] for h in t["hosts"]}
        print("\n".join(sorted(hosts)))
    elif what == "seconds":
        print("%.1f" % seconds(doc, sys.argv[3]))
    elif what == "diff":
        print("\n".join(diffs(doc, sys.argv[3])))
    elif what == "stat":
        print(doc["stats"].get(sys.argv[3], {}).get(sys.argv[4], 0))
    else:
        sys.exit("recap.py: unknown query " + what)


if __name__ == "__main__":
    main()
