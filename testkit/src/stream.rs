//! Deterministic byte streams, write-size generator and the streaming verifier.
//!
//! Everything here is self-implemented (no `rand`) so the byte stream for a given
//! seed never changes with a dependency upgrade.

use sha2::{Digest, Sha256};

/// 2^64 / golden ratio: the splitmix64 increment, also used to derive stream B's seed.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 output function (a bijective 64-bit mixer).
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic, random-access byte stream.
///
/// Definition (this is the wire contract, do not change): with `key = mix64(seed)`,
/// bytes `8k .. 8k+8` of the stream are the little-endian bytes of
/// `mix64(key + (k + 1) * GOLDEN)` (wrapping arithmetic), i.e. the splitmix64
/// sequence started at `key`. Being counter based, the bytes at any offset can be
/// produced independently of how the stream is chunked.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream { key: mix64(seed) }
    }

    /// Stream A: client -> server.
    pub fn c2s(seed: u64) -> Self {
        Stream::new(seed)
    }

    /// Stream B: server -> client.
    pub fn s2c(seed: u64) -> Self {
        Stream::new(seed ^ GOLDEN)
    }

    #[inline(always)]
    fn state(&self, word: u64) -> u64 {
        self.key
            .wrapping_add(word.wrapping_add(1).wrapping_mul(GOLDEN))
    }

    /// The byte at stream offset `off`.
    #[cfg(test)]
    pub fn byte_at(&self, off: u64) -> u8 {
        mix64(self.state(off / 8)).to_le_bytes()[(off % 8) as usize]
    }

    /// Fill `out` with the stream bytes starting at offset `off`.
    pub fn fill(&self, off: u64, out: &mut [u8]) {
        if out.is_empty() {
            return;
        }
        let mut word = off / 8;
        let skip = (off % 8) as usize;
        let mut out = out;
        if skip != 0 {
            let w = mix64(self.state(word)).to_le_bytes();
            let n = (8 - skip).min(out.len());
            out[..n].copy_from_slice(&w[skip..skip + n]);
            out = &mut out[n..];
            word += 1;
        }
        let mut st = self.state(word);
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&mix64(st).to_le_bytes());
            st = st.wrapping_add(GOLDEN);
        }
        let rem = chunks.into_remainder();
        if !rem.is_empty() {
            let n = rem.len();
            rem.copy_from_slice(&mix64(st).to_le_bytes()[..n]);
        }
    }
}

/// Direction tags for the write-size generators.
pub const DIR_C2S: u64 = 0x6332_7300; // "c2s"
pub const DIR_S2C: u64 = 0x7332_6300; // "s2c"

/// xorshift64* generator for write sizes, independent of the content stream.
#[derive(Clone, Debug)]
pub struct SizeGen {
    s: u64,
    max: u64,
}

impl SizeGen {
    pub fn new(seed: u64, dir: u64, max_write: u32) -> Self {
        let mut s = mix64(seed ^ 0xD1B5_4A32_D192_ED03 ^ dir);
        if s == 0 {
            s = GOLDEN;
        }
        SizeGen {
            s,
            max: u64::from(max_write.max(1)),
        }
    }

    #[inline]
    fn next_u64(&mut self) -> u64 {
        self.s ^= self.s >> 12;
        self.s ^= self.s << 25;
        self.s ^= self.s >> 27;
        self.s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Next write size, uniform-ish in `1..=max_write`.
    #[inline]
    pub fn next_size(&mut self) -> usize {
        let r = self.next_u64() >> 32;
        (1 + ((r * self.max) >> 32)) as usize
    }
}

/// First differing byte found by a [`Verifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: u64,
    pub expected: u8,
    pub got: u8,
}

/// Streaming receiver-side verifier: compares received bytes with the regenerated
/// expected stream (chunk by chunk, memcmp fast path) and hashes everything received.
pub struct Verifier {
    stream: Stream,
    offset: u64,
    hasher: Sha256,
    mismatch: Option<Mismatch>,
    expected: Vec<u8>,
}

impl Verifier {
    pub fn new(stream: Stream, chunk: usize) -> Self {
        Verifier {
            stream,
            offset: 0,
            hasher: Sha256::new(),
            mismatch: None,
            expected: vec![0; chunk.max(64)],
        }
    }

    /// Feed the next received bytes (stream offset continues from the previous call).
    pub fn feed(&mut self, data: &[u8]) {
        self.hasher.update(data);
        if self.mismatch.is_none() {
            let mut done = 0;
            while done < data.len() {
                let n = (data.len() - done).min(self.expected.len());
                let exp = &mut self.expected[..n];
                let got = &data[done..done + n];
                let base = self.offset + done as u64;
                self.stream.fill(base, exp);
                if got != &exp[..] {
                    // Slow path only once: locate the first differing byte.
                    if let Some(i) = got.iter().zip(exp.iter()).position(|(a, b)| a != b) {
                        self.mismatch = Some(Mismatch {
                            offset: base + i as u64,
                            expected: exp[i],
                            got: got[i],
                        });
                    }
                    break;
                }
                done += n;
            }
        }
        self.offset += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.offset
    }

    pub fn mismatch(&self) -> Option<Mismatch> {
        self.mismatch
    }

    pub fn finish(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_chunked(s: &Stream, total: usize, sizes: &[usize]) -> Vec<u8> {
        let mut out = vec![0u8; total];
        let mut off = 0;
        let mut i = 0;
        while off < total {
            let n = sizes[i % sizes.len()].min(total - off);
            s.fill(off as u64, &mut out[off..off + n]);
            off += n;
            i += 1;
        }
        out
    }

    #[test]
    fn deterministic_known_answer() {
        // Pin the stream definition: splitmix64 seeded with mix64(seed).
        let s = Stream::new(0);
        let mut b = [0u8; 16];
        s.fill(0, &mut b);
        let key = mix64(0);
        let w0 = mix64(key.wrapping_add(GOLDEN)).to_le_bytes();
        let w1 = mix64(key.wrapping_add(GOLDEN.wrapping_mul(2))).to_le_bytes();
        assert_eq!(&b[..8], &w0);
        assert_eq!(&b[8..], &w1);
        // Reference splitmix64 value for state 0x9E3779B97F4A7C15 (seed 0, first output).
        assert_eq!(mix64(GOLDEN), 0xE220_A839_7B1D_CDAF);
        // Same seed, same bytes; different seed, different bytes.
        let mut a1 = vec![0u8; 4096];
        let mut a2 = vec![0u8; 4096];
        Stream::new(42).fill(0, &mut a1);
        Stream::new(42).fill(0, &mut a2);
        assert_eq!(a1, a2);
        Stream::new(43).fill(0, &mut a2);
        assert_ne!(a1, a2);
    }

    #[test]
    fn chunking_independent() {
        let s = Stream::c2s(0xDEAD_BEEF);
        let total = 100_003;
        let reference = gen_chunked(&s, total, &[total]);
        for sizes in [
            &[1usize][..],
            &[3, 5, 7, 11],
            &[8],
            &[13, 1, 64, 4095, 9],
            &[65536, 1],
        ] {
            assert_eq!(gen_chunked(&s, total, sizes), reference, "sizes {sizes:?}");
        }
        for off in [0u64, 1, 7, 8, 9, 1000, 99_999] {
            assert_eq!(s.byte_at(off), reference[off as usize]);
        }
    }

    #[test]
    fn streams_a_and_b_differ() {
        let mut a = vec![0u8; 1024];
        let mut b = vec![0u8; 1024];
        Stream::c2s(0).fill(0, &mut a);
        Stream::s2c(0).fill(0, &mut b);
        assert_ne!(a, b);
        // B must not simply be A shifted by a few words.
        for shift in 1..16 {
            Stream::c2s(0).fill(shift * 8, &mut a);
            assert_ne!(a, b);
        }
    }

    #[test]
    fn sizes_in_range_and_varied() {
        for max in [1u32, 2, 7, 65536] {
            let mut g = SizeGen::new(7, DIR_C2S, max);
            let mut seen_max = 0;
            let mut seen_min = usize::MAX;
            for _ in 0..10_000 {
                let n = g.next_size();
                assert!(n >= 1 && n <= max as usize);
                seen_max = seen_max.max(n);
                seen_min = seen_min.min(n);
            }
            if max > 1 {
                assert!(seen_max > seen_min);
            }
        }
    }

    #[test]
    fn verifier_ok_and_mismatch() {
        let s = Stream::s2c(99);
        let mut data = vec![0u8; 300_000];
        s.fill(0, &mut data);
        let mut v = Verifier::new(s, 1000);
        for c in data.chunks(777) {
            v.feed(c);
        }
        assert_eq!(v.mismatch(), None);
        assert_eq!(v.received(), 300_000);
        let h = v.finish();
        assert_eq!(h, <[u8; 32]>::from(Sha256::digest(&data)));

        let mut bad = data.clone();
        bad[123_457] ^= 0xFF;
        bad[200_000] ^= 0x01;
        let mut v = Verifier::new(s, 4096);
        for c in bad.chunks(10_000) {
            v.feed(c);
        }
        let m = v.mismatch().expect("mismatch detected");
        assert_eq!(m.offset, 123_457);
        assert_eq!(m.expected, data[123_457]);
        assert_eq!(m.got, data[123_457] ^ 0xFF);
    }

    #[test]
    fn hex_encoding() {
        assert_eq!(hex(&[0x00, 0xab, 0x10, 0xff]), "00ab10ff");
    }
}
