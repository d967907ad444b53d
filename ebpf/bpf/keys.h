/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, in the order it lists): SOCKHASH keys: addresses
 * as v4-mapped IPv6, the namespace rule for loopback, and the key of either end of a
 * connection.
 */
#ifndef BYPASS_KEYS_H
#define BYPASS_KEYS_H

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

#endif
