// SPDX-License-Identifier: GPL-2.0-only
/*
 * bypassd link datapath: one tc ingress program (attached with TCX) on every
 * interface of a configured link.
 *
 * - pair mode (Kata style): every frame arriving on one side leaves through the
 *   other side's egress (bpf_redirect), so the bridge between them is skipped.
 * - bridge mode: a unicast frame to a MAC known on another port of the same bridge
 *   goes straight to that port; broadcast, multicast, unknown destinations, VLAN
 *   tags and DHCP/DHCPv6 continue through the bridge untouched (KubeVirt's DHCP
 *   server listens on the bridge).
 *
 * A frame this program does not redirect returns TC_ACT_UNSPEC (TCX_NEXT), so any
 * later tc program on the interface still sees it.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "bypass_abi.h"

#define IPPROTO_UDP_ 17
#define ETH_HLEN_ 14

char _license[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BL_MAX_PORTS);
	__type(key, __u32);
	__type(value, struct bl_port);
} bl_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BL_MAX_FDB);
	__type(key, struct bl_mac);
	__type(value, struct bl_fdb_entry);
} bl_fdb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BL_MAX_PORTS);
	__type(key, __u32);
	__type(value, struct bl_stats);
} bl_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BL_CTL_MAX);
	__type(key, __u32);
	__type(value, __u64);
} bl_control SEC(".maps");

static __always_inline void count(__u32 slot, __u32 len, int redirected)
{
	struct bl_stats *s = bpf_map_lookup_elem(&bl_stats, &slot);

	if (!s)
		return;
	if (redirected) {
		s->redirected_frames++;
		s->redirected_bytes += len;
	} else {
		s->passed_frames++;
		s->passed_bytes += len;
	}
}

static __always_inline int deliver(__u32 slot, __u32 len, __u32 ifindex)
{
	struct bl_port *to = bpf_map_lookup_elem(&bl_ports, &ifindex);

	/* The destination is not (or no longer) one of this link's ports. */
	if (!to) {
		count(slot, len, 0);
		return TC_ACT_UNSPEC;
	}
	count(slot, len, 1);
	if (to->flags & BL_PORT_PEER)
		return bpf_redirect_peer(ifindex, 0);
	return bpf_redirect(ifindex, 0);
}

/* UDP to or from the DHCP (67/68) or DHCPv6 (546/547) ports, or IPv6 with
 * extension headers (not parsed here): these stay on the bridge. */
static __always_inline int keep_on_bridge(struct __sk_buff *skb, __u16 proto)
{
	__u16 ports[2];
	__u32 off;
	__u8 b;

	if (proto == bpf_htons(ETH_P_IP)) {
		__u8 vihl, l4;

		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &vihl, 1) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN_ + 9, &l4, 1))
			return 0;
		if (l4 != IPPROTO_UDP_)
			return 0;
		off = ETH_HLEN_ + (vihl & 0xf) * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 6, &b, 1))
			return 0;
		/* Extension headers before UDP: keep it on the bridge to be safe. */
		if (b != IPPROTO_UDP_)
			return b != 6 /* TCP */ && b != 58 /* ICMPv6 */;
		off = ETH_HLEN_ + 40;
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)))
		return 0;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		__u16 p = bpf_ntohs(ports[i]);

		if (p == 67 || p == 68 || p == 546 || p == 547)
			return 1;
	}
	return 0;
}

static __always_inline void learn(struct bl_mac *src, __u32 ifindex, __u64 now)
{
	struct bl_fdb_entry *e = bpf_map_lookup_elem(&bl_fdb, src);

	/* Refresh at most once a second per MAC: a write per frame would bounce the line. */
	if (e && e->ifindex == ifindex && now - e->seen_ns < 1000000000ULL)
		return;
	struct bl_fdb_entry n = { .ifindex = ifindex, .flags = 0, .seen_ns = now };
	bpf_map_update_elem(&bl_fdb, src, &n, BPF_ANY);
}

static __always_inline int bridge(struct __sk_buff *skb, __u32 in, __u32 slot)
{
	struct {
		struct bl_mac dst;
		struct bl_mac src;
	} m = {};
	__u16 proto;
	__u64 now = bpf_ktime_get_ns();

	if (bpf_skb_load_bytes(skb, 0, m.dst.addr, 6) || bpf_skb_load_bytes(skb, 6, m.src.addr, 6) ||
	    bpf_skb_load_bytes(skb, 12, &proto, 2))
		goto pass;
	/* The source MAC lives behind this port: a MAC that moved is followed at once. */
	if (!(m.src.addr[0] & 1))
		learn(&m.src, in, now);
	if (m.dst.addr[0] & 1) /* broadcast and multicast */
		goto pass;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		goto pass;
	if (keep_on_bridge(skb, proto))
		goto pass;

	struct bl_fdb_entry *e = bpf_map_lookup_elem(&bl_fdb, &m.dst);
	if (!e || e->ifindex == in)
		goto pass;
	/* Not heard from within the bridge's ageing time: let the bridge flood it. */
	__u32 k = BL_CTL_AGEING_NS;
	__u64 *ageing = bpf_map_lookup_elem(&bl_control, &k);
	if (ageing && *ageing && now - e->seen_ns > *ageing)
		goto pass;
	return deliver(slot, skb->len, e->ifindex);
pass:
	count(slot, skb->len, 0);
	return TC_ACT_UNSPEC;
}

SEC("classifier")
int bypass_link_ingress(struct __sk_buff *skb)
{
	__u32 in = skb->ifindex;
	struct bl_port *p = bpf_map_lookup_elem(&bl_ports, &in);

	if (!p)
		return TC_ACT_UNSPEC;
	if (p->flags & BL_PORT_BRIDGE)
		return bridge(skb, in, p->slot);
	if (!p->target) {
		count(p->slot, skb->len, 0);
		return TC_ACT_UNSPEC;
	}
	return deliver(p->slot, skb->len, p->target);
}
