/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The BPF ABI of bypassd: every map key, value and index that the C programs and
 * the Rust loader share. The Rust mirror is ebpf/src/abi.rs; the test
 * ebpf/tests/layout.rs compiles this header with the host C compiler and checks
 * that every size and offset agrees. Change both sides together and bump
 * BP_ABI_VERSION: the daemon then builds a new datapath generation beside the old
 * one instead of reusing incompatible pinned maps.
 */
#ifndef BYPASS_ABI_H
#define BYPASS_ABI_H

#include <linux/types.h>

#define BP_ABI_VERSION 3

/* Maximum number of policy rules in one buffer (the rule map holds two buffers). */
#define BP_MAX_RULES 64

/* Counter indices in the per-CPU counter array. */
enum bp_counter {
	BP_CTR_SOCKETS_INSERTED = 0,
	BP_CTR_INSERT_FAILURES = 1,
	BP_CTR_REDIRECTED_MSGS = 2,
	BP_CTR_REDIRECTED_BYTES = 3,
	BP_CTR_PASSED_MSGS = 4,
	BP_CTR_PASSED_BYTES = 5,
	BP_CTR_POLICY_KERNEL = 6,  /* sockets the policy left on the kernel path */
	BP_CTR_PAUSED_SKIPS = 7,   /* sockets not inserted while paused */
	BP_CTR_ORDER_WAIT = 8,     /* sends kept on TCP: the peer had TCP data unread */
	BP_CTR_BACKPRESSURE = 9,   /* sends kept on TCP: the peer's redirect queue was full */
	BP_CTR_NOT_READY = 10,     /* sends kept on TCP: the peer never read with recvmsg yet */
	BP_CTR_SPLICE_KEPT = 11,   /* sends kept on TCP: the peer reads with splice */
	BP_CTR_SPLICE_SEEN = 12,   /* accelerated sockets seen reading with splice (once each) */
	BP_CTR_SPLICE_STRANDED = 13, /* ...of which had redirected bytes queued then (unsafe) */
	BP_CTR_SPLICE_REFUSED = 14, /* splice/sendfile reads refused by the BPF LSM guard */
	BP_CTR_STRANDED_DROPS = 15, /* sends refused (EACCES): peer splices with bytes stranded */
	BP_CTR_COALESCED = 16,     /* small sends kept on TCP: the peer still held redirected data */
	BP_CTR_PEER_STALE = 17,    /* sends kept on TCP: the peer's socket was gone or reused */
	BP_CTR_MAX = 18,
};

/* Indices in the control array (u64 values). */
enum bp_control {
	BP_CTL_POLICY_SEQ = 0, /* active rule buffer = seq & 1; bumped on every swap */
	BP_CTL_PAUSED = 1,     /* non-zero: do not insert new sockets */
	BP_CTL_QUEUE_CAP = 2,  /* max bytes queued for one receiver; 0 = its SO_RCVBUF */
	BP_CTL_RECV_GATE = 3,  /* non-zero: a receiver is a redirect target only after a recvmsg */
	BP_CTL_COALESCE_BELOW = 4, /* sends smaller than this take TCP while the peer holds redirected data */
	BP_CTL_MAX = 5,
};

/* Rule actions. */
#define BP_ACTION_KERNEL 0
#define BP_ACTION_ACCELERATE 1

/* bp_rule.flags */
#define BP_RULE_MATCH_CGROUP (1u << 0)
#define BP_RULE_MATCH_UID (1u << 1)

/*
 * SOCKHASH key: one socket, seen from its own side. Addresses are IPv6; IPv4 is
 * stored IPv4-mapped (::ffff:a.b.c.d) so a dual-stack socket pairs with its IPv4
 * peer. netns is the network namespace cookie when the connection cannot leave
 * its namespace (loopback, or local == remote), else 0.
 */
struct bp_sock_key {
	__u8 local_ip[16];
	__u8 remote_ip[16];
	__u32 local_port;  /* host byte order */
	__u32 remote_port; /* host byte order */
	__u64 netns;
};

/* One policy rule. Ports: an inclusive range; 0..65535 matches any port. */
struct bp_rule {
	__u8 local_ip[16];
	__u8 remote_ip[16];
	__u8 local_prefix;  /* bits of local_ip that must match, 0..128 */
	__u8 remote_prefix; /* likewise for remote_ip */
	__u8 action;        /* BP_ACTION_* */
	__u8 flags;         /* BP_RULE_MATCH_* */
	__u16 local_port_lo;
	__u16 local_port_hi;
	__u16 remote_port_lo;
	__u16 remote_port_hi;
	__u32 uid;
	__u64 cgroup_id;
};

/* Per-buffer policy header: how many rules are valid and what to do otherwise. */
struct bp_policy_meta {
	__u32 nrules;
	__u32 default_action;
};

/* Per-socket storage, recorded at socket creation and inherited by accepted sockets. */
struct bp_sk_info {
	__u64 cgroup_id;
	__u32 uid;
	__u32 flags; /* BP_SK_* */
	__u32 recv_seq; /* copied_seq after its last consuming recvmsg (the rx hook's fast exit) */
	__u32 pad;
};

#define BP_SK_KNOWN (1u << 0)      /* cgroup_id and uid are valid */
#define BP_SK_NO_REDIRECT_IN (1u << 1) /* created by a known splice reader (bp_splicers) */
#define BP_SK_READY (1u << 2)      /* its bp_rx entry is marked ready and recv_seq published */

/* bp_splicers: process names (comm, 16 bytes, NUL padded) whose sockets never get
 * redirected data. Value: how the name got there. */
#define BP_COMM_LEN 16
#define BP_SPLICER_CONFIGURED (1u << 0)
#define BP_SPLICER_LEARNED (1u << 1)

/*
 * What a sender needs to know about an accelerated receiver, keyed by the receiver's
 * SOCKHASH key. sock_ops writes it at establishment (sk, cookie, flags); the rx hook
 * publishes copied_seq after each consuming recvmsg; the sender reads the receiver's
 * live state through sk (copied_seq, redirect queue), checks cookie against reuse,
 * and takes a live copied_seq beyond the published one for a splice reader.
 */
struct bp_rx_state {
	__u32 copied_seq; /* receiver's copied_seq after its last consuming recvmsg */
	__u32 rcvbuf;     /* receiver's SO_RCVBUF at establishment */
	__u64 queued;     /* redirected bytes on the receiver's psock queue, as the last send saw */
	__u32 ready;      /* 1: has consumed data with recvmsg (or the recvmsg gate is off) */
	__u32 spliced;    /* 1: reads with splice: never a redirect target again */
	__u64 sk;         /* the receiver's struct sock (read with probe reads only) */
	__u64 cookie;     /* its socket cookie: sk is trusted only while this matches */
};

#endif
