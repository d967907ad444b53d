/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, in the order it lists): splice detection (kprobe,
 * syscall tracepoints) and the LSM splice guard, with the socket -> bp_rx lookup they
 * share.
 */
#ifndef BYPASS_SPLICE_H
#define BYPASS_SPLICE_H

/* An accelerated socket's bp_rx state, found by its cookie (these hooks get a bare sock). */
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
#define BP_NR_SPLICE 76
#define BP_NR_SENDFILE 71
#else /* x86 (kernel.h refuses other targets) */
#define BP_NR_SPLICE 275
#define BP_NR_SENDFILE 40
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

#endif
