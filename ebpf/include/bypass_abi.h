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

#define BP_ABI_VERSION 10

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
	/* NAT pairing (service mesh capture): see bp_nat_peer. */
	BP_CTR_ORIGDST_SEEN = 16,       /* SO_ORIGINAL_DST answers the getsockopt program observed */
	BP_CTR_NAT_PAIRED_LOCAL = 17,   /* pairs made: app <-> its own proxy (capture in OUTPUT) */
	BP_CTR_NAT_PAIRED_INBOUND = 18, /* pairs made: peer in another namespace (capture in PREROUTING) */
	BP_CTR_NAT_UNPAIRED = 19,       /* answers not paired (a socket not accelerated, or nat_not_client) */
	BP_CTR_NAT_REDIRECTED_MSGS = 20,  /* of redirected_msgs: sent to a NAT peer */
	BP_CTR_NAT_REDIRECTED_BYTES = 21, /* of redirected_bytes: sent to a NAT peer */
	BP_CTR_NAT_CLEARED = 22,        /* NAT entries removed (two per pair) because a socket closed */
	BP_CTR_COALESCED = 23,     /* small sends kept on TCP: the peer still held redirected data */
	BP_CTR_PEER_STALE = 24,    /* sends kept on TCP: the peer's socket was gone or reused */
	/* The redirect window (bp_rx_state.window): see bpf/window.h. */
	BP_CTR_WINDOW_GROWN = 25,  /* receivers' windows doubled: a whole window read within BP_PACE_NS */
	BP_CTR_BACKPRESSURE_GROWN = 26, /* of backpressure_msgs: the queue held a grown window */
	BP_CTR_PRESSURE_HELD = 27, /* of backpressure_msgs: a grown window not used, TCP memory under pressure */
	/* Senders (see sendmode.h): sockets whose sends run sk_msg. */
	BP_CTR_SENDER_AT_INSERT = 28, /* made senders at establishment (send_mode = all) */
	BP_CTR_SENDER_PROMOTED = 29,  /* made senders later (request/response); written by the daemon only */
	BP_CTR_SENDER_FAILED = 30,    /* could not join bp_senders or ask to: stay targets only (kernel-speed sends) */
	/* 31-33: reserved for the other helpers' counters (merge plan). */
	BP_CTR_NAT_LOCAL_REDIRECTED_BYTES = 34, /* of nat_redirected_bytes: app <-> its own sidecar */
	BP_CTR_NAT_NOT_CLIENT = 35, /* answers not paired: the tuple's owner is another connection */
	BP_CTR_PROMOTE_FAILED = 36, /* promotions the daemon could not make (socket gone, no owner found); daemon only */
	BP_CTR_MAX = 37,
};

/* Indices in the control array (u64 values). */
enum bp_control {
	BP_CTL_POLICY_SEQ = 0, /* active rule buffer = seq & 1; bumped on every swap */
	BP_CTL_PAUSED = 1,     /* non-zero: do not insert new sockets */
	BP_CTL_QUEUE_CAP = 2,  /* bytes queued for a receiver before it proves its pace; 0 = its SO_RCVBUF */
	BP_CTL_RECV_GATE = 3,  /* non-zero: a receiver is a redirect target only after a recvmsg */
	BP_CTL_COALESCE_BELOW = 4, /* sends smaller than this take TCP while the peer holds redirected data */
	BP_CTL_SEND_MODE = 5,  /* BP_SEND_*: which sockets run sk_msg on their sends */
	/* The daemon's pid namespace (st_dev, st_ino of /proc/self/ns/pid): a promotion
	 * request names its reader as the daemon's /proc sees it (0: unknown). */
	BP_CTL_PIDNS_DEV = 6,
	BP_CTL_PIDNS_INO = 7,
	BP_CTL_MAX = 8,
};

/* BP_CTL_SEND_MODE values. */
#define BP_SEND_ALL 0  /* every accelerated socket is a sender from establishment */
#define BP_SEND_AUTO 1 /* targets only until their traffic turns request/response */
#define BP_SEND_NONE 2 /* targets only: nothing is redirected */

/* bp_rx_state.send: this socket's sender state. */
#define BP_SENDER_NONE 0      /* a redirect target only: sends take plain TCP */
#define BP_SENDER_WANTED 1    /* qualified (auto); asks for promotion once its peer qualifies too */
#define BP_SENDER_AT_INSERT 2 /* a sender since establishment */
#define BP_SENDER_UNPAIRED 3  /* qualified, but its peer never did: stays a target, like its peer */
#define BP_SENDER_FAILED 4    /* joining bp_senders failed: stays a target only */
#define BP_SENDER_QUEUED 5    /* its request is queued: a sender once the daemon inserted it */

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

/* Per-socket storage: a known splice reader's sockets get it at creation (accepted sockets
 * inherit it), accelerated sockets at insertion; policy reads cgroup and uid from the socket. */
struct bp_sk_info {
	__u64 cgroup_id;
	__u32 uid;
	__u32 flags; /* BP_SK_* */
	__u32 recv_seq; /* copied_seq after its last consuming recvmsg (the rx hook's fast exit) */
	__u32 promote;  /* 1: asked for promotion, its next read queues a bp_promote_req (its
			 * own word: sock_ops and the rx hook write it and flags unlocked) */
};

#define BP_SK_KNOWN (1u << 0)      /* cgroup_id and uid are valid */
#define BP_SK_NO_REDIRECT_IN (1u << 1) /* created by a known splice reader (bp_splicers) */
#define BP_SK_READY (1u << 2)      /* its bp_rx entry is marked ready and recv_seq published */

/*
 * bp_promote_q (a BPF queue): a promotion request, pushed by the rx hook in the reading
 * process (so tgid is a process holding the socket: its pid in the daemon's pid
 * namespace when it runs there, else in the initial one; ino is the socket inode). The daemon finds the descriptor in /proc/<tgid>/fd, takes a
 * copy with pidfd_getfd(2), checks the cookie and inserts it into bp_senders.
 */
struct bp_promote_req {
	struct bp_sock_key key;
	__u64 cookie;
	__u64 ino;
	__u32 tgid;
	__u32 fd_hint; /* the fd argument of the read syscall that ran the hook; BP_NO_FD_HINT: none */
};

#define BP_NO_FD_HINT 0xffffffffu

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
	/* The redirect window (bpf/window.h), kept by the senders: */
	__u64 redirected; /* bytes ever redirected to it (minus queued = bytes it has read) */
	__u64 pace_read;  /* ...its read figure when the current pace sample began */
	__u64 pace_ns;    /* when that sample began (CLOCK_MONOTONIC ns) */
	__u32 window;     /* bound grown beyond queue_cap by its pace; 0 = none */
	__u32 send;       /* BP_SENDER_*: does this socket's own sending run sk_msg */
	__u16 turns;      /* send_mode auto: RTT samples at which the conversation had turned */
	__u16 samples;    /* ...of all RTT samples watched */
	__u32 seen_in;    /* data_segs_in at the last RTT sample */
	__u32 turn_seq;   /* ...write_seq at the last turn (what it wrote per turn) */
	__u32 pad;
};

/*
 * bp_nat: NAT pairing, keyed by a socket's own SOCKHASH key, one entry per socket of
 * a pair (both directions). Written by the cgroup/getsockopt program when a proxy
 * reads SO_ORIGINAL_DST on an accepted socket P: P pairs with the socket whose own
 * tuple is (local = P's remote, remote = the original destination), which is the
 * tuple conntrack holds. Removed when either socket closes.
 */
struct bp_nat_peer {
	struct bp_sock_key peer; /* the other socket's own key */
	__u32 path;              /* BP_NAT_PATH_* */
	__u32 reserved;
};

#define BP_NAT_PATH_LOCAL 1   /* the proxy's listener is on loopback: OUTPUT capture, same netns */
#define BP_NAT_PATH_INBOUND 2 /* any other listener address: PREROUTING capture */
/* ======================================================================== */
/* Link datapath (ebpf/bpf/link.bpf.c): tc ingress programs on VM/container   */
/* links. One object is loaded per configured [[links]] entry; its maps are   */
/* pinned in the entry's folder. Independent of the socket datapath above.    */
/* ======================================================================== */

#define BL_ABI_VERSION 1

/* Ports (and counter slots) per entry; FDB entries per bridge entry. */
#define BL_MAX_PORTS 64
#define BL_MAX_FDB 4096

/* bl_port.flags: how frames are delivered TO this port, and what it is. */
#define BL_PORT_PEER (1u << 0)   /* veth whose peer is in another netns: bpf_redirect_peer */
#define BL_PORT_BRIDGE (1u << 1) /* bridge mode: forward by destination MAC (bl_fdb) */

/* bl_ports: key = ifindex (__u32) of an attached interface. */
struct bl_port {
	__u32 target;    /* pair mode: ifindex every frame goes to; 0 in bridge mode */
	__u32 slot;      /* index in bl_stats */
	__u32 flags;     /* BL_PORT_* */
	__u32 offload;   /* user space only: original offloads, BL_OFF_* */
};

/* bl_port.offload: the offloads found before bypassd changed them (restored on detach). */
#define BL_OFF_RX_SAVED (1u << 0)
#define BL_OFF_RX_ON (1u << 1)
#define BL_OFF_TX_SAVED (1u << 2)
#define BL_OFF_TX_ON (1u << 3)

/* bl_fdb: where a MAC lives, learned from the source MAC of frames arriving on a
 * port (so a moved MAC is followed at its first frame) and from the bridge FDB. */
struct bl_mac {
	__u8 addr[6];
	__u16 pad;
};

struct bl_fdb_entry {
	__u32 ifindex;
	__u32 flags;   /* reserved, 0 */
	__u64 seen_ns; /* CLOCK_MONOTONIC ns of the last frame from this MAC (or FDB event) */
};

/* bl_stats: per-CPU, one per slot (port). */
struct bl_stats {
	__u64 redirected_frames;
	__u64 redirected_bytes;
	__u64 passed_frames;
	__u64 passed_bytes;
};

/* bl_control indices (__u64 values). */
enum bl_control {
	BL_CTL_AGEING_NS = 0, /* learned FDB entries older than this are not used */
	BL_CTL_MAX = 1,
};

#endif
