/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, after the key helpers and bp_rx): NAT pairing
 * for service-mesh capture. See docs/mesh.md.
 */
#ifndef BYPASS_MESH_NAT_H
#define BYPASS_MESH_NAT_H

/* ---- NAT pairing (service mesh capture; docs/mesh.md) ----------------------------
 * A proxy behind an iptables/nftables REDIRECT (Istio, Consul, Linkerd) asks the
 * kernel for the original destination of each accepted socket P. The answer names
 * the client socket C exactly: C's own tuple is (local = P's remote, remote = the
 * original destination), the tuple conntrack matched. bp_nat records the pair in
 * both directions; sk_msg then sends to the NAT peer instead of the swapped tuple.
 * The program only reads the answer: it never changes optval, optlen or retval.
 */
#define BP_SOL_IP 0
#define BP_SOL_IPV6 41
#define BP_SO_ORIGINAL_DST 80 /* SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST */

/* Capacity follows the SOCKHASH (set by the loader); memory follows the pairs made. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct bp_sock_key);
	__type(value, struct bp_nat_peer);
} bp_nat SEC(".maps");

static __always_inline int key_eq(const struct bp_sock_key *a, const struct bp_sock_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4] &&
	       x[5] == y[5];
}

/*
 * Turn a socket's own key into the key of the socket its data goes to: its NAT peer
 * when a proxy's SO_ORIGINAL_DST paired them, else the owner of the swapped tuple.
 * Returns the NAT path (BP_NAT_PATH_*), 0 for the swapped tuple.
 */
static __always_inline int peer_key_from(struct bp_sock_key *k)
{
	struct bp_nat_peer *n = bpf_map_lookup_elem(&bp_nat, k);

	if (n) {
		*k = n->peer;
		return n->path ? n->path : BP_NAT_PATH_INBOUND;
	}
	swap_key(k);
	return 0;
}

/* The same for the socket sending msg. */
static __always_inline int peer_key_of(struct sk_msg_md *msg, struct bp_sock_key *k)
{
	key_from_msg(msg, k);
	return peer_key_from(k);
}

/* A socket closes: its pairing goes, both directions (the peer's entry only if it
 * still points back here), so a reused tuple never pairs with a dead socket. */
static __always_inline void nat_forget(const struct bp_sock_key *k)
{
	struct bp_nat_peer *n = bpf_map_lookup_elem(&bp_nat, k), *back;
	struct bp_sock_key peer;

	if (!n)
		return;
	peer = n->peer;
	back = bpf_map_lookup_elem(&bp_nat, &peer);
	/* Count entries as they are deleted: when both sockets close at once, both get
	 * here, and only the deletes that succeed say what was removed. */
	if (back && key_eq(&back->peer, k) && !bpf_map_delete_elem(&bp_nat, &peer))
		count(BP_CTR_NAT_CLEARED, 1);
	if (!bpf_map_delete_elem(&bp_nat, k))
		count(BP_CTR_NAT_CLEARED, 1);
}

static __always_inline void key_from_sock(struct bpf_sock *sk, struct bp_sock_key *k, __u64 netns)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (sk->family == AF_INET) {
		set_v4mapped(k->local_ip, sk->src_ip4);
		set_v4mapped(k->remote_ip, sk->dst_ip4);
	} else {
		__u32 *l = (__u32 *)k->local_ip, *r = (__u32 *)k->remote_ip;

		l[0] = sk->src_ip6[0];
		l[1] = sk->src_ip6[1];
		l[2] = sk->src_ip6[2];
		l[3] = sk->src_ip6[3];
		r[0] = sk->dst_ip6[0];
		r[1] = sk->dst_ip6[1];
		r[2] = sk->dst_ip6[2];
		r[3] = sk->dst_ip6[3];
	}
	k->local_port = sk->src_port;
	k->remote_port = bpf_ntohs(sk->dst_port);
	finish_key(k, netns);
}

/* Sequence numbers of a socket, read through bp_rx's address (as the peer view does). */
struct tcp_sock___bpnat {
	__u32 rcv_nxt;
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

static __always_inline int seq_le(__u32 a, __u32 b)
{
	return (__s32)(b - a) >= 0;
}

/*
 * Is the socket that owns the derived tuple really the proxy socket's other end?
 * REDIRECT leaves sequence numbers alone, so each way both ends share one sequence
 * space: the sender's snd_una <= the receiver's rcv_nxt <= the sender's write_seq (not
 * snd_nxt: on loopback and veth the receiver may process a segment before the sender
 * advances snd_nxt past it). When conntrack had to remap the client's port (that port
 * already meets the proxy on another connection, e.g. a socket lingering in
 * FIN-WAIT-2), the proxy's tuple names a port the client does not own, and whoever
 * owns (that port -> the original destination) is another connection with its own
 * random ISNs: not paired. Each value only grows and is read after the bound below it
 * and before the bound above it, so concurrent progress cannot fail a real pair.
 */
static __always_inline int same_stream(struct bp_rx_state *crx, struct bp_rx_state *prx)
{
	struct tcp_sock___bpnat *c = (void *)crx->sk, *p = (void *)prx->sk;
	struct sock___bp *csk = (void *)crx->sk, *psk = (void *)prx->sk;
	__u32 c_una, p_rcv, c_end, p_una, c_rcv, p_end;

	c_una = BPF_CORE_READ(c, snd_una);
	p_rcv = BPF_CORE_READ(p, rcv_nxt);
	c_end = BPF_CORE_READ(c, write_seq);
	p_una = BPF_CORE_READ(p, snd_una);
	c_rcv = BPF_CORE_READ(c, rcv_nxt);
	p_end = BPF_CORE_READ(p, write_seq);
	/* Still the sockets bp_rx vouched for (TCP sockets are reused by RCU)? */
	if (BPF_CORE_READ(csk, __sk_common.skc_cookie.counter) != crx->cookie ||
	    BPF_CORE_READ(psk, __sk_common.skc_cookie.counter) != prx->cookie)
		return 0;
	return seq_le(c_una, p_rcv) && seq_le(p_rcv, c_end) && seq_le(p_una, c_rcv) &&
	       seq_le(c_rcv, p_end);
}

/* Runs after the kernel's own handler (it sees the answer the proxy gets). */
SEC("cgroup/getsockopt")
int bypass_getsockopt(struct bpf_sockopt *ctx)
{
	struct bp_nat_peer to_client = {}, to_proxy = {};
	__u8 *optval = ctx->optval, *end = ctx->optval_end;
	struct bpf_sock *sk = ctx->sk;
	struct bp_sock_key pk, ck; /* the proxy's accepted socket, the client's socket */
	struct bp_rx_state *crx, *prx;
	__u64 netns;

	if (ctx->optname != BP_SO_ORIGINAL_DST || ctx->retval != 0 || !sk)
		return 1;
	/* The original destination, read in each branch (the verifier tracks bounds per path). */
	__builtin_memset(&ck, 0, sizeof(ck));
	if (ctx->level == BP_SOL_IP) {
		if (ctx->optlen < 8 || optval + 8 > end || *(__u16 *)optval != AF_INET)
			return 1;
		set_v4mapped(ck.remote_ip, *(__u32 *)(optval + 4));
		ck.remote_port = bpf_ntohs(*(__u16 *)(optval + 2));
	} else if (ctx->level == BP_SOL_IPV6) {
		if (ctx->optlen < 24 || optval + 24 > end || *(__u16 *)optval != AF_INET6)
			return 1;
		__builtin_memcpy(ck.remote_ip, optval + 8, 16);
		ck.remote_port = bpf_ntohs(*(__u16 *)(optval + 2));
	} else {
		return 1;
	}
	count(BP_CTR_ORIGDST_SEEN, 1);
	netns = bpf_get_netns_cookie(ctx);
	key_from_sock(sk, &pk, netns);
	/* The client's own tuple: local = our remote, remote = the original destination. */
	__builtin_memcpy(ck.local_ip, pk.remote_ip, 16);
	ck.local_port = pk.remote_port;
	/* A loopback end keeps the client in this netns, so this cookie is its cookie too. */
	finish_key(&ck, netns);

	/* Only two accelerated sockets pair; the others stay on TCP, as before. */
	crx = bpf_map_lookup_elem(&bp_rx, &ck);
	prx = bpf_map_lookup_elem(&bp_rx, &pk);
	if (!prx || !crx) {
		count(BP_CTR_NAT_UNPAIRED, 1);
		return 1;
	}
	/* The tuple's owner must be this connection's client, not a port's other user. */
	if (!same_stream(crx, prx)) {
		count(BP_CTR_NAT_NOT_CLIENT, 1);
		count(BP_CTR_NAT_UNPAIRED, 1);
		return 1;
	}
	to_client.peer = ck;
	to_proxy.peer = pk;
	to_client.path = is_loopback(pk.local_ip) ? BP_NAT_PATH_LOCAL : BP_NAT_PATH_INBOUND;
	to_proxy.path = to_client.path;
	if (bpf_map_update_elem(&bp_nat, &pk, &to_client, BPF_ANY) ||
	    bpf_map_update_elem(&bp_nat, &ck, &to_proxy, BPF_ANY)) {
		nat_forget(&pk);
		nat_forget(&ck);
		count(BP_CTR_NAT_UNPAIRED, 1);
		return 1;
	}
	/*
	 * A socket that closed meanwhile ran its cleanup before our insert: undo. If it
	 * closes after this check, its cleanup (bp_rx first, then bp_nat) sees our entries.
	 */
	if (!bpf_map_lookup_elem(&bp_rx, &pk) || !bpf_map_lookup_elem(&bp_rx, &ck)) {
		nat_forget(&pk);
		count(BP_CTR_NAT_UNPAIRED, 1);
		return 1;
	}
	count(to_client.path == BP_NAT_PATH_LOCAL ? BP_CTR_NAT_PAIRED_LOCAL : BP_CTR_NAT_PAIRED_INBOUND, 1);
	return 1; /* never refuse or alter a getsockopt */
}
/* ---- end of NAT pairing ---------------------------------------------------------- */

#endif
