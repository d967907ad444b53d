/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Split sending from receiving: which accelerated sockets run sk_msg.
 *
 * Every admitted socket goes into bp_socks, the map redirects land in; no program is
 * attached to it, so a socket that is only there sends through plain tcp_sendmsg
 * (kernel speed: tcp_bpf's send path, even with a program that always passes, costs
 * 25-40 % on small writes). The sk_msg program is attached to bp_senders: a socket
 * in it too has its sends judged and redirected.
 *
 * When a socket becomes a sender (BP_CTL_SEND_MODE):
 * - BP_SEND_ALL: at establishment, every socket.
 * - BP_SEND_AUTO: it starts as a target only; sock_ops watches its RTT samples and
 *   asks for promotion once its conversation keeps turning (request/response:
 *   redirecting cuts latency) and its peer's does too (peer_wants), never for a
 *   stream of writes (where TCP's coalescing wins). sock_ops can insert into a SOCKHASH only at establishment, and
 *   map iterators (iter/sockmap) are refused on some kernels, so the socket's next read
 *   (the rx hook, in a process holding it) queues a request in bp_promote_q and the
 *   daemon inserts it from user space (bypassd/src/datapath/promote.rs).
 *   Joining bp_senders late is safe: the order rule in sk_msg keeps passing until the
 *   peer has read every byte this socket sent on TCP.
 * - BP_SEND_NONE: no sender at all (the kernel's speed for everything; measurement).
 * A socket never leaves bp_senders while alive: leaving every map would drop its
 * unread redirected data, and leaving one map does not detach the program anyway.
 */
#ifndef BYPASS_SENDMODE_H
#define BYPASS_SENDMODE_H

/* The senders: sk_msg is attached here. Same keys as bp_socks. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct bp_sock_key);
	__type(value, __u32);
} bp_senders SEC(".maps");

/* Bumped for each queued promotion request: the daemon pops bp_promote_q when it
 * moved (one u64, not per CPU, so one read tells). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bp_promote_seq SEC(".maps");

/* Promotion requests for the daemon (see sendmode_request). */
struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, 1024);
	__type(value, struct bp_promote_req);
} bp_promote_q SEC(".maps");

/*
 * Promotion rule. At each RTT sample (an ACK of new data) the conversation has
 * "turned" when everything this socket wrote is sent and acknowledged (write_seq ==
 * snd_nxt == snd_una: it waits for an answer) and data came in since the previous
 * sample (the answer). Request/response turns at almost every sample (at every
 * other one behind delayed ACKs); a one-way stream never does, and a stream of small
 * writes behind Nagle keeps unsent bytes queued (write_seq > snd_nxt).
 * A turn whose answer was a burst (more than BP_PROMOTE_BURST bytes written since the
 * previous turn: a 256 KiB HTTP response, 32 pipelined 16 KiB redis replies) does not
 * count. A redirect moves a write only once it is all copied in, and the sender then
 * waits on the reader's socket lock, while TCP hands a burst over segment by segment
 * and the reader copies out as the writer copies in: redirected, such bursts ran at
 * 0.69-0.90x the kernel (nginx 256 KiB, redis 16 KiB -P 32), against 1.2x at 16 KiB.
 */
#define BP_PROMOTE_TURNS 8    /* turns seen before promotion */
#define BP_PROMOTE_WATCH 256  /* samples watched before giving up (a stream) */
#define BP_PROMOTE_BURST (64 * 1024)

/* At establishment, after the socket is in bp_socks: make it a sender now, or let
 * sock_ops watch it. A failed insert leaves it a target only (kernel-speed sends). */
static __always_inline void sendmode_insert(struct bpf_sock_ops *ops, struct bp_sock_key *key, __u32 *cb_flags)
{
	struct bp_rx_state *rx;
	__u64 mode = control(BP_CTL_SEND_MODE);

	if (mode == BP_SEND_AUTO) {
		*cb_flags |= BPF_SOCK_OPS_RTT_CB_FLAG;
		return;
	}
	if (mode != BP_SEND_ALL)
		return;
	rx = bpf_map_lookup_elem(&bp_rx, key);
	if (bpf_sock_hash_update(ops, &bp_senders, key, BPF_NOEXIST)) {
		count(BP_CTR_SENDER_FAILED, 1);
		if (rx)
			rx->send = BP_SENDER_FAILED;
		return;
	}
	if (rx)
		rx->send = BP_SENDER_AT_INSERT;
	count(BP_CTR_SENDER_AT_INSERT, 1);
}

/*
 * A connection promotes both its sockets or neither. With one end a sender and the
 * other not (wrk's requests redirected, nginx's 256 KiB answers on TCP; redis-benchmark's
 * pipelined GETs and redis's 512 KiB replies), the TCP direction loses the ACKs that
 * rode on the other direction's segments: 0.81-0.86x the kernel at 1.17-1.32x its CPU
 * per request (two runs), against 0.92x (CPU 1.09-1.10x) with neither end a sender.
 */
static __always_inline int peer_wants(const struct bp_sock_key *key)
{
	struct bp_sock_key k = *key;
	struct bp_rx_state *p;

	peer_key_from(&k);
	p = bpf_map_lookup_elem(&bp_rx, &k);
	return p && (p->send == BP_SENDER_WANTED || p->send == BP_SENDER_QUEUED || p->send == BP_SENDER_AT_INSERT);
}

/* Ask for promotion: the socket's next read queues the request (sendmode_request),
 * which runs in a process holding it, as the daemon needs. */
static __always_inline void sendmode_ask(struct bpf_sock *sk, struct bp_rx_state *rx)
{
	struct bp_sk_info *info = bpf_sk_storage_get(&bp_sk_info, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (info) {
		info->promote = 1;
		return;
	}
	rx->send = BP_SENDER_FAILED;
	count(BP_CTR_SENDER_FAILED, 1);
}

/* An RTT sample of a watched socket: has its conversation turned often enough, and
 * its peer's too? */
static __always_inline void sendmode_rtt(struct bpf_sock_ops *ops)
{
	struct bp_sock_key key;
	struct bp_rx_state *rx;
	struct tcp_sock___bp *tp;
	struct bpf_sock *sk = ops->sk;
	__u32 in = ops->data_segs_in;

	if (!sk)
		return;
	tp = (void *)bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	key_from_ops(ops, &key);
	rx = bpf_map_lookup_elem(&bp_rx, &key);
	if (!rx)
		goto stop;
	if (rx->send == BP_SENDER_WANTED) {
		/* Qualified: waits (within the watch) for its peer to qualify too. */
		if (peer_wants(&key)) {
			sendmode_ask(sk, rx);
			goto stop;
		}
		if (++rx->samples < BP_PROMOTE_WATCH)
			return;
		rx->send = BP_SENDER_UNPAIRED;
		goto stop;
	}
	if (rx->send != BP_SENDER_NONE)
		goto stop;
	if (in != rx->seen_in && ops->snd_una == ops->snd_nxt && tp->write_seq == ops->snd_nxt) {
		if (tp->write_seq - rx->turn_seq <= BP_PROMOTE_BURST)
			rx->turns++;
		rx->turn_seq = tp->write_seq;
	}
	rx->seen_in = in;
	rx->samples++;
	if (rx->turns >= BP_PROMOTE_TURNS && 2 * rx->turns >= rx->samples) {
		rx->send = BP_SENDER_WANTED;
		if (peer_wants(&key)) {
			sendmode_ask(sk, rx);
			goto stop;
		}
		return;
	}
	if (rx->samples < BP_PROMOTE_WATCH)
		return;
stop:
	/* Decided (or a stream): no more RTT callbacks for this socket. */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
}

/* The read syscalls (read, readv, recvfrom, recvmsg, recvmmsg): each takes the fd first. */
#if defined(__TARGET_ARCH_arm64)
#define BP_IS_READ_NR(n) ((n) == 63 || (n) == 65 || (n) == 207 || (n) == 212 || (n) == 243)
#else
#define BP_IS_READ_NR(n) ((n) == 0 || (n) == 19 || (n) == 45 || (n) == 47 || (n) == 299)
#endif

/*
 * The descriptor the current read syscall names, or BP_NO_FD_HINT (io_uring, and any
 * other way in). A hint only: the daemon checks the cookie of what it copies, and else
 * scans /proc/<tgid>/fdinfo.
 */
static __always_inline __u32 read_syscall_fd(void)
{
	struct pt_regs___bp *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr;

	if (!regs)
		return BP_NO_FD_HINT;
	nr = BP_SYSCALL_NR(regs);
	return BP_IS_READ_NR(nr) ? (__u32)BP_SYSCALL_ARG0(regs) : BP_NO_FD_HINT;
}

/*
 * From the rx hook, in the process that just read from a socket that asked: queue the
 * request for the daemon, which inserts the socket into bp_senders (user space can
 * insert a socket it holds a descriptor of; no program type the kernel allows here
 * can). A full queue (the daemon stopped) leaves the socket a target only, counted.
 */
static __always_inline void sendmode_request(struct sock___bp *sk, struct bp_sock_key *key,
					     struct bp_rx_state *rx, __u64 cookie)
{
	struct bp_promote_req req = {};
	struct bpf_pidns_info ns = {};
	__u64 ns_dev = control(BP_CTL_PIDNS_DEV), ns_ino = control(BP_CTL_PIDNS_INO);
	__u32 zero = 0;
	__u64 *seq;

	/* Two threads reading at once may both get here: the daemon's second insert finds
	 * the socket there already (BPF_NOEXIST) and counts nothing. */
	if (rx->send != BP_SENDER_WANTED)
		return;
	rx->send = BP_SENDER_QUEUED;
	__builtin_memcpy(&req.key, key, sizeof(req.key));
	req.cookie = cookie;
	req.ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	req.fd_hint = read_syscall_fd();
	/* The pid the daemon's /proc knows: its own namespace's when the reader runs in it
	 * (bypassd in a container with its apps), else the initial one's (bypassd on the
	 * host). A reader in neither is not found; the cookie check stops any mix-up. */
	if (ns_ino && !bpf_get_ns_current_pid_tgid(ns_dev, ns_ino, &ns, sizeof(ns)))
		req.tgid = ns.tgid;
	else
		req.tgid = bpf_get_current_pid_tgid() >> 32;
	if (!req.ino || bpf_map_push_elem(&bp_promote_q, &req, 0)) {
		rx->send = BP_SENDER_FAILED;
		count(BP_CTR_SENDER_FAILED, 1);
		return;
	}
	seq = bpf_map_lookup_elem(&bp_promote_seq, &zero);
	if (seq)
		__sync_fetch_and_add(seq, 1);
}

#endif
