#!/usr/bin/python
# Copyright: bypassd developers
# GNU General Public License v2.0 only (see COPYING or https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
"""Make bypassd's runtime rules exactly a given [[rules]] document."""

from __future__ import annotations

import json

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: bypassd_policy
short_description: Make bypassd's runtime rules exactly a [[rules]] TOML document
description:
  - Asks bypassd with C(bypassctl --json policy apply --dry-run -) whether the rules
    would change anything, then applies them with C(bypassctl --json policy apply -).
    Reports changed only when bypassd says so. In check mode only the dry run runs.
    With --diff, shows the runtime rules before and after.
options:
  rules:
    description: A TOML document of [[rules]] tables, as C(bypassctl policy apply) takes it.
    type: str
    required: true
  bypassctl:
    description: The bypassctl program.
    type: str
    default: bypassctl
author: bypassd developers
"""

EXAMPLES = r"""
- name: Apply the runtime policy
  bypassd_policy:
    rules: |
      [[rules]]
      name = "loopback"
      action = "accelerate"
      local_cidr = "127.0.0.0/8"
      remote_cidr = "127.0.0.0/8"
"""

RETURN = r"""
before:
  description: The runtime rules before, one "INDEX (NAME): SUMMARY" line each.
  type: list
  returned: always
after:
  description: The runtime rules after (in check mode, what they would be).
  type: list
  returned: always
"""


def run(module, args, rules):
    """Run bypassctl --json ARGS with the rules on stdin; its one JSON document."""
    rc, out, err = module.run_command([module.params["bypassctl"], "--json"] + args, data=rules, binary_data=True)
    try:
        doc = json.loads(out)
    except ValueError:
        module.fail_json(msg="bypassctl %s printed no JSON (exit %d): %s" % (" ".join(args), rc, err.strip() or out.strip()))
    if rc != 0 or "error" in doc:
        e = doc.get("error", {})
        module.fail_json(msg="bypassctl %s: %s" % (" ".join(args), e.get("message", err.strip())), rc=rc, error=e)
    return doc


def lines(rules):
    return ["%d%s: %s" % (r["index"], " (%s)" % r["name"] if r.get("name") else "", r["summary"]) for r in rules]


def main():
    module = AnsibleModule(
        argument_spec={"rules": {"type": "str", "required": True}, "bypassctl": {"type": "str", "default": "bypassctl"}},
        supports_check_mode=True,
    )
    rules = module.params["rules"]
    dry = run(module, ["policy", "apply", "--dry-run", "-"], rules)
    before, after = lines(dry["before"]), lines(dry["after"])
    result = {
        "changed": bool(dry["changed"]),
        "before": before,
        "after": after,
        "diff": {
            "before_header": "runtime rules",
            "after_header": "runtime rules",
            "before": "".join(x + "\n" for x in before),
            "after": "".join(x + "\n" for x in after),
        },
    }
    if dry["changed"] and not module.check_mode:
        result["changed"] = bool(run(module, ["policy", "apply", "-"], rules)["changed"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
