// SPDX-License-Identifier: GPL-2.0-only
/*
 * bypassd socket datapath.
 *
 * sock_ops puts each established TCP socket that the policy admits into a SOCKHASH
 * under its own 4-tuple; sk_msg looks up the peer (the swapped tuple) and hands the
 * message straight to the peer's receive queue, as long as three rules hold (see
 * bypass_sk_msg): bytes stay in order, the peer's redirect queue stays bounded, and
 * the peer reads with recvmsg (splice(2) never sees redirected data). Otherwise the
 * message takes the ordinary TCP path, where TCP's own flow control applies.
 * The sender reads the receiver's progress live (bp_rx holds its socket pointer); the
 * only receive hook (tp_btf sock:sock_recv_length) marks a receiver ready once.
 *
 * Layout: this file holds the hooks on the send and receive paths (sock_create,
 * sock_ops, sk_msg, the rx hook); the headers, in include order, hold the maps
 * (maps.h), keys (keys.h), the policy walk (policy.h), the kernel structures read
 * through CO-RE (kernel.h), NAT pairing (mesh_nat.h), the peer view (peer.h), the
 * redirect window (window.h) and the splice detection and guard programs (splice.h).
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "bypass_abi.h"

#define AF_INET 2
#define AF_INET6 10
#define SK_PASS_VERDICT 1

char _license[] SEC("license") = "GPL";

#include "maps.h"
#include "keys.h"
#include "policy.h"
#include "kernel.h"

/* NAT pairing (service mesh): bp_nat, peer_key_of, nat_forget, the getsockopt program. */
#include "mesh_nat.h"

#include "peer.h"
#include "window.h"
/* Which sockets run sk_msg: bp_senders, promotion (sock_ops RTT samples, the rx hook's requests). */
#include "sendmode.h"

SEC("cgroup/sock_create")
int bypass_sock_create(struct bpf_sock *sk)
{
	struct bp_sk_info *info;

	/* TCP only: not AF_UNIX, not MPTCP (its subflows are the TCP sockets). */
	if ((sk->family != 2 /* AF_INET */ && sk->family != 10 /* AF_INET6 */) ||
	    sk->type != 1 /* SOCK_STREAM */ || sk->protocol != 6 /* IPPROTO_TCP */)
		return 1;
	char comm[BP_COMM_LEN] = {};

	/* Storage only for a known splice reader's sockets (and, by BPF_F_CLONE, the ones
	 * it accepts): they never receive redirected data. Policy reads cgroup and uid
	 * from the socket itself, so other sockets cost no allocation here (churn). */
	bpf_get_current_comm(comm, sizeof(comm));
	if (!bpf_map_lookup_elem(&bp_splicers, comm))
		return 1;
	info = bpf_sk_storage_get(&bp_sk_info, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (info) {
		info->cgroup_id = bpf_get_current_cgroup_id();
		info->uid = (__u32)bpf_get_current_uid_gid();
		info->flags = BP_SK_KNOWN | BP_SK_NO_REDIRECT_IN;
	}
	return 1; /* never refuse a socket */
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *ops)
{
	struct bp_sock_key key;
	struct bp_sk_info *info = 0;
	struct bp_rx_state rx = {};
	struct tcp_sock___bp *tp;
	struct sock___bp *s;
	struct bpf_sock *sk;
	__u32 cb_flags, uid;
	__u64 cookie, cgroup_id;
	long err;

	if (ops->op == BPF_SOCK_OPS_RTT_CB) {
		sendmode_rtt(ops);
		return 1;
	}
	if (ops->op == BPF_SOCK_OPS_STATE_CB) {
		/* A closing socket's receive state goes; the SOCKHASH drops it by itself. */
		if (ops->args[1] == BPF_TCP_CLOSE) {
			key_from_ops(ops, &key);
			bpf_map_delete_elem(&bp_rx, &key);
			cookie = bpf_get_socket_cookie(ops);
			bpf_map_delete_elem(&bp_cookies, &cookie);
			nat_forget(&key); /* after bp_rx: see bypass_getsockopt */
		}
		return 1;
	}
	if (ops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (ops->family != AF_INET && ops->family != AF_INET6)
		return 1;
	if (control(BP_CTL_PAUSED)) {
		count(BP_CTR_PAUSED_SKIPS, 1);
		return 1;
	}
	key_from_ops(ops, &key);
	sk = ops->sk;
	if (!sk)
		return 1;
	tp = (void *)bpf_skc_to_tcp_sock(sk);
	if (!tp) {
		count(BP_CTR_INSERT_FAILURES, 1);
		return 1;
	}
	s = (void *)tp;
	cgroup_id = BPF_CORE_READ(s, sk_cgrp_data.cgroup, kn, id);
	uid = BPF_CORE_READ(s, sk_uid.val);
	if (!policy_admits(&key, cgroup_id, uid)) {
		count(BP_CTR_POLICY_KERNEL, 1);
		return 1;
	}
	/* Admitted sockets get storage (the rx hook's per-read exit); a splice reader's
	 * has it from sock_create. Without it (no memory) the rx hook takes the long way. */
	info = bpf_sk_storage_get(&bp_sk_info, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (info && !info->flags) {
		info->cgroup_id = cgroup_id;
		info->uid = uid;
		info->flags = BP_SK_KNOWN;
	}
	/*
	 * Receive state before the SOCKHASH entry: a sender that finds us there also finds
	 * this. BPF_NOEXIST: a live socket with the same key keeps its state (and entry).
	 */
	rx.copied_seq = tp->copied_seq;
	rx.turn_seq = tp->write_seq;
	rx.rcvbuf = ((struct sock___bp *)tp)->sk_rcvbuf;
	rx.ready = !control(BP_CTL_RECV_GATE);
	/* A known splice reader: TCP only, as if it had been seen splicing. */
	rx.spliced = info && (info->flags & BP_SK_NO_REDIRECT_IN);
	/* The sender reads our live state through this address (probe reads only),
	 * trusting it only while the cookie matches (TCP sockets are reused by RCU). */
	rx.sk = (__u64)(unsigned long)tp;
	cookie = bpf_get_socket_cookie(ops);
	rx.cookie = cookie;
	if (bpf_map_update_elem(&bp_rx, &key, &rx, BPF_NOEXIST)) {
		count(BP_CTR_INSERT_FAILURES, 1);
		return 1;
	}
	if (bpf_map_update_elem(&bp_cookies, &cookie, &key, BPF_ANY))
		goto undo;
	/* BPF_NOEXIST: replacing a live socket's entry would drop its unread data. */
	err = bpf_sock_hash_update(ops, &bp_socks, &key, BPF_NOEXIST);
	if (err) {
		bpf_map_delete_elem(&bp_cookies, &cookie);
		goto undo;
	}
	cb_flags = ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG;
	sendmode_insert(ops, &key, &cb_flags);
	bpf_sock_ops_cb_flags_set(ops, cb_flags);
	count(BP_CTR_SOCKETS_INSERTED, 1);
	return 1;
undo:
	bpf_map_delete_elem(&bp_rx, &key);
	count(BP_CTR_INSERT_FAILURES, 1);
	return 1;
}

/*
 * May this send be redirected to the peer's ingress? Every rule below falls back to
 * SK_PASS: the message then takes the ordinary TCP path, where nothing is lost and
 * TCP's own flow control blocks the sender (or gives it EAGAIN).
 * - recvmsg first: splice(2) reads only the TCP receive queue and never sees the
 *   psock queue; a receiver that has not consumed data with recvmsg yet (or ever
 *   spliced) gets nothing redirected, so a splice reader finds all its data on TCP.
 * - order: every byte we ever sent on the TCP path must already have been read by
 *   the peer (our write_seq == its live copied_seq). The receiver drains its psock
 *   queue before its TCP queue, so redirecting while our TCP bytes wait would let new
 *   bytes overtake them. Redirect -> TCP is always safe; TCP -> redirect once drained.
 * - backpressure: when the peer's psock queue (live msg_tot_len) would exceed its
 *   window, the send takes TCP. The window is queue_cap (0: the peer's SO_RCVBUF) until
 *   the reader proves its pace, then grows as TCP's receive autotuning would (window.h).
 *   An empty queue always takes one.
 * - coalescing (adaptive, never a safety rule): a small send while the peer still
 *   holds a little redirected data (a stream of small writes) takes TCP, which merges
 *   such sends into few segments and wakeups; a send to an idle peer
 *   (request/response) is redirected at once.
 * Passing is always safe, so only a redirect (and the stranded refusal) needs the
 * peer's identity confirmed by its cookie.
 */
SEC("sk_msg")
int bypass_sk_msg(struct sk_msg_md *msg)
{
	struct bp_sock_key key;
	struct bpf_sock *me = msg->sk;
	struct tcp_sock___bp *mt;
	struct bp_rx_state *rx;
	__u32 size = msg->size;
	__u32 copied, queued;
	__u64 base, coalesce;
	int stranded = 0;
	int nat;

	if (!me)
		goto pass;
	nat = peer_key_of(msg, &key);
	rx = bpf_map_lookup_elem(&bp_rx, &key);
	if (!rx)
		goto pass; /* the peer is not accelerated */
	if (!rx->ready && !rx->spliced) {
		count(BP_CTR_NOT_READY, 1);
		goto pass;
	}
	queued = peer_queued(rx);
	if (rx->spliced) {
		/*
		 * A splice reader sees TCP data but never the psock queue: with that queue
		 * empty, TCP is the only safe path from now on. With bytes already stranded
		 * there (it read with recvmsg, then switched to splice), no path is safe for
		 * splice: TCP bytes would reach it ahead of the stranded ones (corruption).
		 * Keep redirecting while the queue has room (the stream stays in order for a
		 * recvmsg fallback), and refuse sends beyond that (EACCES to the sender)
		 * instead of passing them: loud, bounded, never reordered.
		 */
		if (!queued) {
			count(BP_CTR_SPLICE_KEPT, 1);
			goto pass;
		}
		stranded = 1;
		if (!rx->ready) {
			count(BP_CTR_NOT_READY, 1);
			goto pass;
		}
	}
	base = window_base(rx);
	if (!stranded)
		window_pace(rx, queued, base); /* also while on TCP: the reader drains then */
	mt = (void *)bpf_skc_to_tcp_sock(me);
	copied = peer_copied_seq(rx);
	if (!mt || mt->write_seq != copied) {
		count(BP_CTR_ORDER_WAIT, 1);
		goto seen;
	}
	/*
	 * recvmsg first, live: the receiver's TCP bytes must all have been consumed by
	 * recvmsg (published by the rx hook after each consuming read). A live copied_seq
	 * beyond that means splice read them (or a recvmsg has not returned yet): TCP.
	 */
	if (!stranded && control(BP_CTL_RECV_GATE) && copied != rx->copied_seq) {
		count(BP_CTR_NOT_READY, 1);
		goto seen;
	}
	/* A splice reader's stranded queue never gets a grown window. */
	if (stranded ? queued + size > base : window_refuses(rx, queued, size, base)) {
		count(BP_CTR_BACKPRESSURE, 1);
		goto seen;
	}
	/* A stream of small writes keeps a short queue; a bulk stream a long one, where a
	 * detour to TCP would last until the reader had read everything (rule 3). */
	coalesce = control(BP_CTL_COALESCE_BELOW);
	if (queued && !stranded && size < coalesce && queued < 16 * coalesce) {
		count(BP_CTR_COALESCED, 1);
		goto seen;
	}
	if (!peer_same(rx)) {
		count(BP_CTR_PEER_STALE, 1);
		stranded = 0; /* not the socket we judged: nothing to refuse for */
		goto pass;
	}
	/*
	 * A failed redirect (the peer left the map meanwhile) returns SK_DROP without
	 * redirecting; we return SK_PASS ourselves, so the message takes the TCP path.
	 */
	if (bpf_msg_redirect_hash(msg, &bp_socks, &key, BPF_F_INGRESS) != SK_PASS_VERDICT)
		goto pass;
	rx->queued = queued + size;
	rx->redirected += size;
	count(BP_CTR_REDIRECTED_MSGS, 1);
	count(BP_CTR_REDIRECTED_BYTES, size);
	if (nat) {
		count(BP_CTR_NAT_REDIRECTED_MSGS, 1);
		count(BP_CTR_NAT_REDIRECTED_BYTES, size);
		if (nat == BP_NAT_PATH_LOCAL)
			count(BP_CTR_NAT_LOCAL_REDIRECTED_BYTES, size);
	}
	return SK_PASS_VERDICT;

seen:
	/* What this send saw, for `bypassctl` and the tests (the live figures rule). */
	rx->queued = queued;
	if (stranded && !peer_same(rx))
		stranded = 0;
pass:
	if (stranded) {
		count(BP_CTR_STRANDED_DROPS, 1);
		return 0; /* SK_DROP */
	}
	count(BP_CTR_PASSED_MSGS, 1);
	count(BP_CTR_PASSED_BYTES, size);
	return SK_PASS_VERDICT;
}

/*
 * After every recvmsg/read of any socket on the host: mark an accelerated receiver as
 * a recvmsg reader (a redirect target) once a read has CONSUMED data. A read that
 * found nothing (EAGAIN, as an event loop's first try) or only peeked proves nothing:
 * such a reader may splice its very first byte, and marking it would let redirected
 * bytes strand where splice never looks (issue 10: the sender got EACCES, the splice
 * reader EOF with 0 bytes). The splice tracepoint cannot close that window: it fires
 * at the reader's first splice call, after the sender may already have redirected.
 */
#define BP_MSG_PEEK 2

SEC("tp_btf/sock_recv_length")
int bypass_rx_done(__u64 *ctx)
{
	struct sock___bp *sk = (void *)ctx[0];
	int ret = (int)ctx[1];
	int flags = (int)ctx[2];
	struct tcp_sock___bp *tp;
	struct bp_sk_info *info;
	struct bp_rx_state *rx;
	struct bp_sock_key *key;
	__u32 seq;
	__u64 cookie;

	/* Runs for every read on the host: leave on the first check that fails (no data
	 * consumed, no psock = in no sockmap, nothing new to publish). */
	if (ret <= 0 || (flags & BP_MSG_PEEK) || !sk || !sk->sk_user_data)
		return 0;
	tp = (void *)bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	seq = tp->copied_seq;
	info = bpf_sk_storage_get(&bp_sk_info, sk, 0, 0);
	/* Reading redirected data moves no copied_seq: in redirect mode this is the exit
	 * (unless the socket asked for promotion: see sendmode_request). */
	if (info && (info->flags & BP_SK_READY) && !info->promote && info->recv_seq == seq)
		return 0;
	cookie = sk->__sk_common.skc_cookie.counter;
	key = cookie ? bpf_map_lookup_elem(&bp_cookies, &cookie) : 0;
	if (!key)
		return 0;
	rx = bpf_map_lookup_elem(&bp_rx, key);
	if (!rx)
		return 0;
	/* What recvmsg has consumed: a sender seeing a live copied_seq beyond this knows
	 * something else (splice) consumed since, and redirects nothing. */
	rx->copied_seq = seq;
	if (!rx->ready)
		rx->ready = 1;
	if (!info)
		return 0;
	info->recv_seq = seq;
	info->flags |= BP_SK_READY; /* only this hook sets it */
	if (info->promote) {
		info->promote = 0;
		sendmode_request(sk, key, rx, cookie);
	}
	return 0;
}

/* Splice detection and the splice guard (programs too): see splice.h. */
#include "splice.h"
