/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, in the order it lists): the policy walk (first
 * matching rule of the active buffer) that sock_ops asks before accelerating a socket.
 */
#ifndef BYPASS_POLICY_H
#define BYPASS_POLICY_H

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
	__u64 cgroup_id; /* the socket's cgroup v2 (its creator's, inherited by accepted sockets) */
	__u32 uid;
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
		if ((r->flags & BP_RULE_MATCH_CGROUP) && c->cgroup_id != r->cgroup_id)
			return 0;
		if ((r->flags & BP_RULE_MATCH_UID) && c->uid != r->uid)
			return 0;
	}
	c->action = r->action;
	return 1;
}

/* First matching rule of the active buffer wins; a swap mid-walk makes us walk again. */
static __always_inline int policy_admits(struct bp_sock_key *key, __u64 cgroup_id, __u32 uid)
{
	int attempt;

	for (attempt = 0; attempt < 2; attempt++) {
		__u64 seq = control(BP_CTL_POLICY_SEQ);
		__u32 buf = seq & 1;
		struct bp_policy_meta *meta = bpf_map_lookup_elem(&bp_policy, &buf);
		struct match_ctx c = {
			.key = key,
			.cgroup_id = cgroup_id,
			.uid = uid,
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

#endif
