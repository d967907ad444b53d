/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, in the order it lists): the maps of the socket
 * datapath (bp_nat lives in mesh_nat.h) and the counter/control accessors.
 */
#ifndef BYPASS_MAPS_H
#define BYPASS_MAPS_H

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

#endif
