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

/* Capacity is set by the loader from config (BPF_MAP_TYPE_SOCKHASH max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct bp_sock_key);
	__type(value, __u32); /* a socket fd when written from user space */
} bp_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BP_CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} bp_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BP_CTL_MAX);
	__type(key, __u32);
	__type(value, __u64);
} bp_control SEC(".maps");

/* Two rule buffers back to back: buffer b holds indices b*BP_MAX_RULES ... */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * BP_MAX_RULES);
	__type(key, __u32);
	__type(value, struct bp_rule);
} bp_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct bp_policy_meta);
} bp_policy SEC(".maps");

/* Receive state of each accelerated socket; capacity follows the SOCKHASH.
 * BPF_F_NO_PREALLOC: memory follows the sockets accelerated, not the capacity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bp_sock_key);
	__type(value, struct bp_rx_state);
} bp_rx SEC(".maps");

/* Socket cookie -> SOCKHASH key, for the kprobes (they cannot use socket storage). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct bp_sock_key);
} bp_cookies SEC(".maps");

/* Known splice readers by process name: configured, or learned when seen splicing. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, char[BP_COMM_LEN]);
	__type(value, __u64);
} bp_splicers SEC(".maps");

/* BPF_F_CLONE: an accepted socket inherits its listener's cgroup and uid. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct bp_sk_info);
} bp_sk_info SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&bp_counters, &idx);

	if (v)
		*v += n;
}

static __always_inline __u64 control(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&bp_control, &idx);

	return v ? *v : 0;
}

static __always_inline void set_v4mapped(__u8 *dst, __u32 ip4)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &ip4, 4);
}

static __always_inline int is_loopback(const __u8 *ip)
{
	const __u32 *w = (const __u32 *)ip;

	if (w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff))
		return ip[12] == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

static __always_inline int ip_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/*
 * A connection with a loopback end (or a self-addressed one) never leaves its
 * namespace, so two namespaces may use the same tuple at once: key it by namespace
 * too. Both ends must decide alike: the rule looks at both addresses, never at
 * which side this socket is on (127.0.0.6:p -> 10.0.0.2:80 and its accepted
 * 10.0.0.2:80 <- 127.0.0.6:p both carry the cookie).
 */
static __always_inline void finish_key(struct bp_sock_key *k, __u64 netns)
{
	int local_only = is_loopback(k->local_ip) || is_loopback(k->remote_ip) ||
			 ip_eq(k->local_ip, k->remote_ip);

	k->netns = local_only ? netns : 0;
}

static __always_inline void key_from_ops(struct bpf_sock_ops *ops, struct bp_sock_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (ops->family == AF_INET) {
		set_v4mapped(k->local_ip, ops->local_ip4);
		set_v4mapped(k->remote_ip, ops->remote_ip4);
	} else {
		__u32 *l = (__u32 *)k->local_ip, *r = (__u32 *)k->remote_ip;

		l[0] = ops->local_ip6[0];
		l[1] = ops->local_ip6[1];
		l[2] = ops->local_ip6[2];
		l[3] = ops->local_ip6[3];
		r[0] = ops->remote_ip6[0];
		r[1] = ops->remote_ip6[1];
		r[2] = ops->remote_ip6[2];
		r[3] = ops->remote_ip6[3];
	}
	k->local_port = ops->local_port;
	k->remote_port = bpf_ntohl(ops->remote_port);
	finish_key(k, bpf_get_netns_cookie(ops));
}

/* This socket's own key, as sock_ops stored it. */
static __always_inline void key_from_msg(struct sk_msg_md *msg, struct bp_sock_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (msg->family == AF_INET) {
		set_v4mapped(k->local_ip, msg->local_ip4);
		set_v4mapped(k->remote_ip, msg->remote_ip4);
	} else {
		__u32 *l = (__u32 *)k->local_ip, *r = (__u32 *)k->remote_ip;

		l[0] = msg->local_ip6[0];
		l[1] = msg->local_ip6[1];
		l[2] = msg->local_ip6[2];
		l[3] = msg->local_ip6[3];
		r[0] = msg->remote_ip6[0];
		r[1] = msg->remote_ip6[1];
		r[2] = msg->remote_ip6[2];
		r[3] = msg->remote_ip6[3];
	}
	k->local_port = msg->local_port;
	k->remote_port = bpf_ntohl(msg->remote_port);
	finish_key(k, bpf_get_netns_cookie(msg));
}

/* The other end's own key of a connection: the tuple swapped (netns stays). */
static __always_inline void swap_key(struct bp_sock_key *k)
{
	__u8 ip[16];
	__u32 port = k->local_port;

	__builtin_memcpy(ip, k->local_ip, 16);
	__builtin_memcpy(k->local_ip, k->remote_ip, 16);
	__builtin_memcpy(k->remote_ip, ip, 16);
	k->local_port = k->remote_port;
	k->remote_port = port;
}

static __always_inline int prefix_match(const __u8 *addr, const __u8 *net, __u32 plen)
{
	const __u32 *a = (const __u32 *)addr, *n = (const __u32 *)net;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		__u32 bits = plen > 32 * i ? plen - 32 * i : 0;
		__u32 mask;

		if (bits == 0)
			break;
		mask = bits >= 32 ? 0xffffffff : ~(0xffffffffu >> bits);
		if ((a[i] ^ n[i]) & bpf_htonl(mask))
			return 0;
	}
	return 1;
}

struct match_ctx {
	struct bp_sock_key *key;
	struct bp_sk_info *info; /* may be NULL: socket created before bypassd */
	__u32 base;
	__u32 nrules;
	__s32 action; /* -1 until a rule matches */
};

static long match_rule(__u32 i, void *data)
{
	struct match_ctx *c = data;
	struct bp_rule *r;
	__u32 idx;

	if (i >= c->nrules)
		return 1;
	idx = c->base + i;
	r = bpf_map_lookup_elem(&bp_rules, &idx);
	if (!r)
		return 1;
	if (c->key->local_port < r->local_port_lo || c->key->local_port > r->local_port_hi)
		return 0;
	if (c->key->remote_port < r->remote_port_lo || c->key->remote_port > r->remote_port_hi)
		return 0;
	if (!prefix_match(c->key->local_ip, r->local_ip, r->local_prefix))
		return 0;
	if (!prefix_match(c->key->remote_ip, r->remote_ip, r->remote_prefix))
		return 0;
	if (r->flags & (BP_RULE_MATCH_CGROUP | BP_RULE_MATCH_UID)) {
		if (!c->info || !(c->info->flags & BP_SK_KNOWN))
			return 0;
		if ((r->flags & BP_RULE_MATCH_CGROUP) && c->info->cgroup_id != r->cgroup_id)
			return 0;
		if ((r->flags & BP_RULE_MATCH_UID) && c->info->uid != r->uid)
			return 0;
	}
	c->action = r->action;
	return 1;
}

/* First matching rule of the active buffer wins; a swap mid-walk makes us walk again. */
static __always_inline int policy_admits(struct bp_sock_key *key, struct bp_sk_info *info)
{
	int attempt;

	for (attempt = 0; attempt < 2; attempt++) {
		__u64 seq = control(BP_CTL_POLICY_SEQ);
		__u32 buf = seq & 1;
		struct bp_policy_meta *meta = bpf_map_lookup_elem(&bp_policy, &buf);
		struct match_ctx c = {
			.key = key,
			.info = info,
			.base = buf * BP_MAX_RULES,
			.action = -1,
		};

		if (!meta)
			return 0;
		c.nrules = meta->nrules;
		if (c.nrules > BP_MAX_RULES)
			c.nrules = BP_MAX_RULES;
		bpf_loop(BP_MAX_RULES, match_rule, &c, 0);
		if (c.action < 0)
			c.action = meta->default_action;
		if (control(BP_CTL_POLICY_SEQ) == seq)
			return c.action == BP_ACTION_ACCELERATE;
	}
	return 0; /* rules kept changing under us: stay on the kernel path */
}

/*
 * Kernel structures read through CO-RE: only the named fields are used and relocated
 * to the running kernel's layout (the ___bp suffix is a local flavour, stripped when
 * matching). Read with bpf_probe_read_kernel (BPF_CORE_READ), so kprobes can use them.
 */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)
struct sock_common___bp {
	struct {
		long long counter;
	} skc_cookie;
};

struct sock___bp {
	struct sock_common___bp __sk_common;
	int sk_rcvbuf;
	void *sk_user_data;
};

struct tcp_sock___bp {
	__u32 write_seq;
	__u32 copied_seq;
};

struct sk_psock___bp {
	__u32 msg_tot_len;
};

struct socket___bp {
	void *file;
	struct sock___bp *sk;
};

struct file___bp {
	void *private_data;
};

struct fdtable___bp {
	unsigned int max_fds;
	struct file___bp **fd;
};

struct files_struct___bp {
	struct fdtable___bp *fdt;
};

struct task_struct___bp {
	struct files_struct___bp *files;
};
#pragma clang attribute pop

/* sk_user_data carries flag bits below the psock pointer (SK_USER_DATA_PTRMASK). */
#define BP_USER_DATA_PTRMASK (~7UL)

/* NAT pairing (service mesh): bp_nat, peer_key_of, nat_forget, the getsockopt program. */
#include "mesh_nat.h"

/* ---- peer view: the receiver's live state, read by its sender (sk_msg) ----------
 * sk_msg cannot hold a reference to another socket (a SOCKHASH lookup is refused), so
 * sock_ops stores the receiver's address and cookie in bp_rx and the sender reads the
 * fields it needs with probe reads. TCP sockets are SLAB_TYPESAFE_BY_RCU and BPF runs
 * under RCU: the memory stays a socket while we read, and the cookie, read last,
 * tells whether it is still the same socket. Redirected bytes move neither the
 * sender's write_seq nor the receiver's copied_seq, so the order rule stays exact. */
/* (The address goes through a local: inside BPF_CORE_READ, rx->sk would itself get a
 * CO-RE relocation, against a type the kernel does not have.) */
static __always_inline __u32 peer_copied_seq(struct bp_rx_state *rx)
{
	struct tcp_sock___bp *tp = (void *)rx->sk;

	return BPF_CORE_READ(tp, copied_seq);
}

/* Bytes waiting on the receiver's psock queue (redirected, not yet read). */
static __always_inline __u32 peer_queued(struct bp_rx_state *rx)
{
	struct sock___bp *sk = (void *)rx->sk;
	struct sk_psock___bp *psock;
	unsigned long ud;

	ud = (unsigned long)BPF_CORE_READ(sk, sk_user_data);
	psock = (void *)(ud & BP_USER_DATA_PTRMASK);
	if (!psock)
		return 0;
	if (!bpf_core_field_exists(psock->msg_tot_len))
		return rx->queued; /* no exact figure on this kernel: the senders' own tally */
	return BPF_CORE_READ(psock, msg_tot_len);
}

static __always_inline __u32 peer_rcvbuf(struct bp_rx_state *rx)
{
	struct sock___bp *sk = (void *)rx->sk;

	return BPF_CORE_READ(sk, sk_rcvbuf);
}

/* Still the socket sock_ops stored? Read after the fields it vouches for. */
static __always_inline int peer_same(struct bp_rx_state *rx)
{
	struct sock___bp *sk = (void *)rx->sk;
	__u64 cookie = rx->cookie;

	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter) == cookie;
}
/* ---- end of peer view ------------------------------------------------------------ */

SEC("cgroup/sock_create")
int bypass_sock_create(struct bpf_sock *sk)
{
	struct bp_sk_info *info;

	/* TCP only: not AF_UNIX, not MPTCP (its subflows are the TCP sockets). */
	if ((sk->family != 2 /* AF_INET */ && sk->family != 10 /* AF_INET6 */) ||
	    sk->type != 1 /* SOCK_STREAM */ || sk->protocol != 6 /* IPPROTO_TCP */)
		return 1;
	char comm[BP_COMM_LEN] = {};

	info = bpf_sk_storage_get(&bp_sk_info, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (info) {
		info->cgroup_id = bpf_get_current_cgroup_id();
		info->uid = (__u32)bpf_get_current_uid_gid();
		info->flags = BP_SK_KNOWN;
		/* A known splice reader's sockets (and, by BPF_F_CLONE, the ones it accepts)
		 * never receive redirected data. */
		bpf_get_current_comm(comm, sizeof(comm));
		if (bpf_map_lookup_elem(&bp_splicers, comm))
			info->flags |= BP_SK_NO_REDIRECT_IN;
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
	struct bpf_sock *sk;
	__u64 cookie;
	long err;

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
	info = bpf_sk_storage_get(&bp_sk_info, sk, 0, 0);
	if (!policy_admits(&key, info)) {
		count(BP_CTR_POLICY_KERNEL, 1);
		return 1;
	}
	tp = (void *)bpf_skc_to_tcp_sock(sk);
	if (!tp) {
		count(BP_CTR_INSERT_FAILURES, 1);
		return 1;
	}
	/*
	 * Receive state before the SOCKHASH entry: a sender that finds us there also finds
	 * this. BPF_NOEXIST: a live socket with the same key keeps its state (and entry).
	 */
	rx.copied_seq = tp->copied_seq;
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
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
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
 * - backpressure: when the peer's psock queue (live msg_tot_len) already holds the cap
 *   (default: its SO_RCVBUF), the send takes TCP. An empty queue always takes one.
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
	__u64 bound, coalesce;
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
	bound = control(BP_CTL_QUEUE_CAP);
	if (!bound)
		bound = peer_rcvbuf(rx);
	if (queued && queued + size > bound) {
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
	count(BP_CTR_REDIRECTED_MSGS, 1);
	count(BP_CTR_REDIRECTED_BYTES, size);
	if (nat) {
		count(BP_CTR_NAT_REDIRECTED_MSGS, 1);
		count(BP_CTR_NAT_REDIRECTED_BYTES, size);
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

static __always_inline struct bp_rx_state *rx_of(struct sock___bp *sk)
{
	struct bp_sock_key *key;
	__u64 cookie;

	if (!sk || !BPF_CORE_READ(sk, sk_user_data))
		return 0; /* no psock: not in any sockmap */
	cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	if (!cookie)
		return 0;
	key = bpf_map_lookup_elem(&bp_cookies, &cookie);
	if (!key)
		return 0;
	return bpf_map_lookup_elem(&bp_rx, key);
}

static __always_inline __u32 psock_queued(struct sock___bp *sk)
{
	struct sk_psock___bp *psock;
	unsigned long ud = (unsigned long)BPF_CORE_READ(sk, sk_user_data);

	psock = (void *)(ud & BP_USER_DATA_PTRMASK);
	if (!psock)
		return 0;
	return BPF_CORE_READ(psock, msg_tot_len);
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
	/* Reading redirected data moves no copied_seq: in redirect mode this is the exit. */
	if (info && (info->flags & BP_SK_READY) && info->recv_seq == seq)
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
	if (info) {
		info->recv_seq = seq;
		info->flags |= BP_SK_READY; /* only this hook sets it */
	}
	return 0;
}

/*
 * A splice read on an accelerated socket: stop redirecting to it for good. If
 * redirected bytes are already queued, splice cannot see them (the hazard this whole
 * rule set exists to avoid); count it so it is never silent.
 */
static __always_inline void splice_seen(struct sock___bp *sk)
{
	struct bp_rx_state *rx = rx_of(sk);

	__u32 queued;

	if (!rx || rx->spliced)
		return;
	char comm[BP_COMM_LEN] = {};
	__u64 learned = BP_SPLICER_LEARNED;

	queued = psock_queued(sk);
	rx->queued = queued;
	rx->spliced = 1;
	count(BP_CTR_SPLICE_SEEN, 1);
	if (queued)
		count(BP_CTR_SPLICE_STRANDED, 1);
	/* Learn the program: its later sockets are never redirect targets. */
	bpf_get_current_comm(comm, sizeof(comm));
	bpf_map_update_elem(&bp_splicers, comm, &learned, BPF_NOEXIST);
}

/* Where kprobes exist: every TCP splice read, whatever issued it (io_uring too). */
SEC("kprobe/tcp_splice_read")
int bypass_splice_kprobe(struct pt_regs *ctx)
{
	struct socket___bp *sock = (void *)PT_REGS_PARM1(ctx);

	splice_seen(BPF_CORE_READ(sock, sk));
	return 0;
}

/* The socket behind a file descriptor of the current task, or NULL. */
static __always_inline struct sock___bp *fd_sock(long fd)
{
	struct task_struct___bp *task = (void *)bpf_get_current_task();
	struct fdtable___bp *fdt = BPF_CORE_READ(task, files, fdt);
	struct file___bp **fds, *file;
	struct socket___bp *sock;

	if (!fdt || fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	/* Only a socket's file points at a struct socket that points back at it. */
	if (!sock || BPF_CORE_READ(sock, file) != file)
		return 0;
	return BPF_CORE_READ(sock, sk);
}

/* syscalls:sys_enter_splice / sys_enter_sendfile64 records (see their format files). */
struct bp_splice_args {
	__u64 common;
	__u64 nr;
	__u64 fd_in;
};

struct bp_sendfile_args {
	__u64 common;
	__u64 nr;
	__u64 out_fd;
	__u64 in_fd;
};

/* Where only tracepoints exist: splice(2) and sendfile(2) reading a socket. */
SEC("tracepoint/syscalls/sys_enter_splice")
int bypass_splice_seen(struct bp_splice_args *args)
{
	splice_seen(fd_sock((int)args->fd_in));
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendfile64")
int bypass_sendfile_seen(struct bp_sendfile_args *args)
{
	splice_seen(fd_sock((int)args->in_fd));
	return 0;
}

/*
 * Where the kernel runs BPF LSM programs (trampolines): refuse splice(2)/sendfile(2)
 * reads of accelerated sockets with EINVAL, the documented "this file does not
 * support splice" answer, before any data moves. Go's io.Copy and HAProxy then fall
 * back to read/write. Optional: the loader attaches it only where the kernel accepts it.
 */
#if defined(__TARGET_ARCH_arm64)
struct pt_regs___bp {
	long long syscallno;
} __attribute__((preserve_access_index));
#define BP_SYSCALL_NR(r) BPF_CORE_READ(r, syscallno)
#define BP_NR_SPLICE 76
#define BP_NR_SENDFILE 71
#elif defined(__TARGET_ARCH_x86)
struct pt_regs___bp {
	unsigned long orig_ax;
} __attribute__((preserve_access_index));
#define BP_SYSCALL_NR(r) BPF_CORE_READ(r, orig_ax)
#define BP_NR_SPLICE 275
#define BP_NR_SENDFILE 40
#else
#error "splice/sendfile syscall numbers are known for x86 and arm64 only"
#endif

#define BP_EINVAL 22

static __always_inline int is_splice_syscall(void)
{
	struct pt_regs___bp *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr;

	if (!regs)
		return 0;
	nr = BP_SYSCALL_NR(regs);
	return nr == BP_NR_SPLICE || nr == BP_NR_SENDFILE;
}

SEC("lsm/file_permission")
int bypass_splice_guard(__u64 *ctx)
{
	void *file = (void *)ctx[0];
	int mask = (int)ctx[1];
	int ret = (int)ctx[2];
	struct socket___bp *sock;

	if (ret)
		return ret;
	if (!(mask & 4 /* MAY_READ */))
		return 0;
	sock = (void *)bpf_sock_from_file(file);
	if (!sock)
		return 0;
	if (!rx_of(BPF_CORE_READ(sock, sk)))
		return 0;
	if (!is_splice_syscall())
		return 0;
	count(BP_CTR_SPLICE_REFUSED, 1);
	return -BP_EINVAL;
}
