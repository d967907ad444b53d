/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Part of bypass.bpf.c (included once, after peer.h): the redirect window, i.e. how
 * many bytes may wait on a receiver's psock queue before its sender takes TCP.
 */
#ifndef BYPASS_WINDOW_H
#define BYPASS_WINDOW_H

/*
 * Nothing throttles a redirecting sender but this bound (the redirect uncharges the
 * sender and charges only the receiver's forward allocation), and leaving the redirect
 * is costly: by the order rule the stream then stays on TCP until the reader has read
 * everything. TCP itself lets a reader that keeps up hold far more than queue_cap: its
 * receive autotuning grows the buffer with the bytes the reader consumes, up to
 * tcp_rmem[2] (measured here on loopback: 11 MiB after 1 s of a 250 MiB/s reader), and
 * that autotuning never runs for redirected data (the receiver's sk_rcvbuf stays 128 KiB).
 *
 * So the window does the same from the reader's own pace: it starts at queue_cap (the
 * receiver's SO_RCVBUF when 0) and doubles each time the reader has read a whole window
 * within BP_PACE_NS, up to what autotuning could give that receiver (peer_rcvbuf_max).
 * A reader that never reads never grows it: a stalled reader is bounded exactly as
 * before. A grown window is not used while the host's TCP memory is under pressure.
 */
#define BP_PACE_NS (100ULL * 1000 * 1000)
/* The largest queue_cap the config accepts; also guards against a torn read. */
#define BP_WINDOW_LIMIT (1U << 30)

/* The bound before a reader proves its pace. */
static __always_inline __u64 window_base(struct bp_rx_state *rx)
{
	__u64 cap = control(BP_CTL_QUEUE_CAP);

	return cap ? cap : (__u64)peer_rcvbuf(rx);
}

/* Every send that sees the live queue: end the pace sample once the reader has read a
 * whole window since it began; within BP_PACE_NS, the window doubles. */
static __always_inline void window_pace(struct bp_rx_state *rx, __u32 queued, __u64 base)
{
	__u64 win = rx->window > base ? rx->window : base;
	__u64 read, now, max;

	if (queued > rx->redirected)
		return; /* a tally behind the kernel's (a redirect failing later): no sample */
	read = rx->redirected - queued;
	if (!rx->pace_ns) {
		rx->pace_ns = bpf_ktime_get_ns(); /* the first sample: from the first send */
		rx->pace_read = read;
		return;
	}
	if (read - rx->pace_read < win)
		return;
	now = bpf_ktime_get_ns();
	if (now - rx->pace_ns <= BP_PACE_NS && !peer_under_pressure(rx)) {
		max = peer_rcvbuf_max(rx);
		if (max > BP_WINDOW_LIMIT)
			max = BP_WINDOW_LIMIT;
		if (win < max) {
			rx->window = win * 2 < max ? win * 2 : max;
			count(BP_CTR_WINDOW_GROWN, 1);
		}
	}
	rx->pace_ns = now;
	rx->pace_read = read;
}

/*
 * May `size` more bytes join a queue of `queued`? An empty queue always takes one
 * message. Beyond the base, only a grown window admits more, and not under memory
 * pressure. Non-zero: backpressure (the sub-reasons are counted here).
 */
static __always_inline int window_refuses(struct bp_rx_state *rx, __u32 queued, __u32 size, __u64 base)
{
	if (!queued || queued + size <= base)
		return 0;
	if (rx->window <= base)
		return 1;
	if (peer_under_pressure(rx)) {
		count(BP_CTR_PRESSURE_HELD, 1);
		return 1;
	}
	if (queued + size <= rx->window)
		return 0;
	count(BP_CTR_BACKPRESSURE_GROWN, 1);
	return 1;
}

#endif
