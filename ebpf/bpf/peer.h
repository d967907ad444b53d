/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, in the order it lists): the peer view, the
 * receiver's live state as its sender (sk_msg) reads it.
 */
#ifndef BYPASS_PEER_H
#define BYPASS_PEER_H

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

/* What TCP's receive autotuning may grow this receiver's buffer to: tcp_rmem[2] of its
 * network namespace (tcp_rcv_space_adjust clamps there), or nothing more than it has when
 * its program fixed SO_RCVBUF (SOCK_RCVBUF_LOCK: TCP then never autotunes). */
#define BP_SOCK_RCVBUF_LOCK 2

static __always_inline __u32 peer_rcvbuf_max(struct bp_rx_state *rx)
{
	struct sock___bp *sk = (void *)rx->sk;
	struct net___bp *net;
	int max;

	if (BPF_CORE_READ(sk, sk_userlocks) & BP_SOCK_RCVBUF_LOCK)
		return 0;
	net = BPF_CORE_READ(sk, __sk_common.skc_net.net);
	max = BPF_CORE_READ(net, ipv4.sysctl_tcp_rmem[2]);
	return max > 0 ? max : 0;
}

/* Is the host's TCP memory under pressure (tcp_memory_pressure, via the receiver's
 * proto)? TCP stops growing buffers then; so do we. */
static __always_inline int peer_under_pressure(struct bp_rx_state *rx)
{
	struct sock___bp *sk = (void *)rx->sk;
	unsigned long *flag = BPF_CORE_READ(sk, __sk_common.skc_prot, memory_pressure);
	unsigned long v = 0;

	if (flag && bpf_probe_read_kernel(&v, sizeof(v), flag))
		return 1; /* unreadable: assume the worst */
	return v != 0;
}

/* Still the socket sock_ops stored? Read after the fields it vouches for. */
static __always_inline int peer_same(struct bp_rx_state *rx)
{
	struct sock___bp *sk = (void *)rx->sk;
	__u64 cookie = rx->cookie;

	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter) == cookie;
}
/* ---- end of peer view ------------------------------------------------------------ */

#endif
