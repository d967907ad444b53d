/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, in the order it lists): the kernel structures
 * read through CO-RE (only the fields used) and the sk_user_data flag mask.
 */
#ifndef BYPASS_KERNEL_H
#define BYPASS_KERNEL_H

/*
 * Kernel structures read through CO-RE: only the named fields are used and relocated
 * to the running kernel's layout (the ___bp suffix is a local flavour, stripped when
 * matching). Read with bpf_probe_read_kernel (BPF_CORE_READ), so kprobes can use them.
 */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)
struct netns_ipv4___bp {
	int sysctl_tcp_rmem[3];
};

struct net___bp {
	struct netns_ipv4___bp ipv4;
};

struct proto___bp {
	unsigned long *memory_pressure;
};

struct sock_common___bp {
	struct {
		long long counter;
	} skc_cookie;
	struct proto___bp *skc_prot;
	struct {
		struct net___bp *net;
	} skc_net;
};

struct kernfs_node___bp {
	__u64 id;
};

struct cgroup___bp {
	struct kernfs_node___bp *kn;
};

struct socket___bp;

struct sock___bp {
	struct sock_common___bp __sk_common;
	struct socket___bp *sk_socket; /* its socket and file: the inode names its descriptors */
	int sk_rcvbuf;
	unsigned char sk_userlocks;
	void *sk_user_data;
	/* The socket's origin, set at creation and copied to accepted sockets: policy reads
	 * it here, so no socket needs storage for it. */
	struct {
		unsigned int val;
	} sk_uid;
	struct {
		struct cgroup___bp *cgroup;
	} sk_cgrp_data;
};

struct tcp_sock___bp {
	__u32 write_seq;
	__u32 copied_seq;
};

struct sk_psock___bp {
	__u32 msg_tot_len;
};

struct inode___bp {
	unsigned long i_ino;
};

struct file___bp {
	void *private_data;
	struct inode___bp *f_inode;
};

struct socket___bp {
	struct file___bp *file;
	struct sock___bp *sk;
};

struct fdtable___bp {
	unsigned int max_fds;
	struct file___bp **fd;
};

struct files_struct___bp {
	struct fdtable___bp *fdt;
};

/* User registers at syscall entry (bpf_task_pt_regs): the syscall and its first argument. */
#if defined(__TARGET_ARCH_arm64)
struct pt_regs___bp {
	unsigned long long orig_x0;
	long long syscallno;
};
#define BP_SYSCALL_NR(r) BPF_CORE_READ(r, syscallno)
#define BP_SYSCALL_ARG0(r) BPF_CORE_READ(r, orig_x0)
#elif defined(__TARGET_ARCH_x86)
struct pt_regs___bp {
	unsigned long di;
	unsigned long orig_ax;
};
#define BP_SYSCALL_NR(r) BPF_CORE_READ(r, orig_ax)
#define BP_SYSCALL_ARG0(r) BPF_CORE_READ(r, di)
#else
#error "syscall registers are known for x86 and arm64 only"
#endif

struct task_struct___bp {
	struct files_struct___bp *files;
};
#pragma clang attribute pop

/* sk_user_data carries flag bits below the psock pointer (SK_USER_DATA_PTRMASK). */
#define BP_USER_DATA_PTRMASK (~7UL)

#endif
