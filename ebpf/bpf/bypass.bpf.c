// SPDX-License-Identifier: GPL-2.0-only
/*
 * bypassd socket datapath.
 *
 * sock_ops puts each established TCP socket that the policy admits into a SOCKHASH
 * under its own 4-tuple; sk_msg looks up the peer (the swapped tuple) and hands the
 * message straight to the peer's receive queue. A socket whose send ever took the
 * kernel path is pinned to it from then on: the receiver drains its redirect queue
 * before its TCP queue, so switching a direction back to redirect could reorder bytes.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

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
 * Loopback (and self-addressed) connections never leave their namespace, so two
 * namespaces may use the same tuple at once: key them by namespace too.
 */
static __always_inline void finish_key(struct bp_sock_key *k, __u64 netns)
{
	k->netns = (is_loopback(k->remote_ip) || ip_eq(k->local_ip, k->remote_ip)) ? netns : 0;
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

/* The peer's own key: our tuple swapped. */
static __always_inline void peer_key_from_msg(struct sk_msg_md *msg, struct bp_sock_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (msg->family == AF_INET) {
		set_v4mapped(k->local_ip, msg->remote_ip4);
		set_v4mapped(k->remote_ip, msg->local_ip4);
	} else {
		__u32 *l = (__u32 *)k->local_ip, *r = (__u32 *)k->remote_ip;

		l[0] = msg->remote_ip6[0];
		l[1] = msg->remote_ip6[1];
		l[2] = msg->remote_ip6[2];
		l[3] = msg->remote_ip6[3];
		r[0] = msg->local_ip6[0];
		r[1] = msg->local_ip6[1];
		r[2] = msg->local_ip6[2];
		r[3] = msg->local_ip6[3];
	}
	k->local_port = bpf_ntohl(msg->remote_port);
	k->remote_port = msg->local_port;
	finish_key(k, bpf_get_netns_cookie(msg));
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

SEC("cgroup/sock_create")
int bypass_sock_create(struct bpf_sock *sk)
{
	struct bp_sk_info *info;

	if (sk->type != 1 /* SOCK_STREAM */)
		return 1;
	info = bpf_sk_storage_get(&bp_sk_info, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (info) {
		info->cgroup_id = bpf_get_current_cgroup_id();
		info->uid = (__u32)bpf_get_current_uid_gid();
		info->flags = BP_SK_KNOWN;
	}
	return 1; /* never refuse a socket */
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *ops)
{
	struct bp_sock_key key;
	struct bp_sk_info *info = 0;
	struct bpf_sock *sk;
	long err;

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
	if (sk)
		info = bpf_sk_storage_get(&bp_sk_info, sk, 0, 0);
	if (!policy_admits(&key, info)) {
		count(BP_CTR_POLICY_KERNEL, 1);
		return 1;
	}
	/* BPF_NOEXIST: replacing a live socket's entry would drop its unread data. */
	err = bpf_sock_hash_update(ops, &bp_socks, &key, BPF_NOEXIST);
	count(err ? BP_CTR_INSERT_FAILURES : BP_CTR_SOCKETS_INSERTED, 1);
	return 1;
}

SEC("sk_msg")
int bypass_sk_msg(struct sk_msg_md *msg)
{
	struct bp_sock_key key;
	struct bp_sk_info *info = 0;
	__u32 size = msg->size;

	if (msg->sk)
		info = bpf_sk_storage_get(&bp_sk_info, msg->sk, 0, 0);
	if (info && (info->flags & BP_SK_DEMOTED))
		goto pass;

	peer_key_from_msg(msg, &key);
	/*
	 * No peer in the map: the helper returns SK_DROP without redirecting. We then
	 * return SK_PASS ourselves, so the message takes the kernel path, never dropped.
	 */
	if (bpf_msg_redirect_hash(msg, &bp_socks, &key, BPF_F_INGRESS) != SK_PASS_VERDICT)
		goto demote;
	count(BP_CTR_REDIRECTED_MSGS, 1);
	count(BP_CTR_REDIRECTED_BYTES, size);
	return SK_PASS_VERDICT;

demote:
	if (msg->sk) {
		if (!info)
			info = bpf_sk_storage_get(&bp_sk_info, msg->sk, 0,
						  BPF_SK_STORAGE_GET_F_CREATE);
		if (info && !(info->flags & BP_SK_DEMOTED)) {
			info->flags |= BP_SK_DEMOTED;
			count(BP_CTR_DEMOTED, 1);
		}
	}
pass:
	count(BP_CTR_PASSED_MSGS, 1);
	count(BP_CTR_PASSED_BYTES, size);
	return SK_PASS_VERDICT;
}
