//! Wire format of the per-connection header and trailer (all little-endian).
//!
//! Header (client -> server, 40 bytes):
//!   magic u32 = 0x42595053 ("BYPS"), version u32 = 1, c2s_len u64, s2c_len u64,
//!   seed u64, max_write u32, flags u32 (must be 0).
//! Trailer (server -> client after both streams, 41 bytes):
//!   status u8 (0 ok, 1 mismatch, 2 short read), offset u64 (first mismatch offset,
//!   or for a short read the number of bytes received), sha256 [32] of all received bytes.

use anyhow::{Result, bail};

pub const MAGIC: u32 = 0x4259_5053;
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 40;
pub const TRAILER_LEN: usize = 41;
/// Largest accepted max_write (keeps buffers bounded).
pub const MAX_WRITE_LIMIT: u32 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub c2s_len: u64,
    pub s2c_len: u64,
    pub seed: u64,
    pub max_write: u32,
    pub flags: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.c2s_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.s2c_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seed.to_le_bytes());
        b[32..36].copy_from_slice(&self.max_write.to_le_bytes());
        b[36..40].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            bail!(
                "bad header magic 0x{magic:08x} (expected 0x{MAGIC:08x} \"BYPS\"); header bytes: {}",
                crate::stream::hex(b)
            );
        }
        let version = u32_at(4);
        if version != VERSION {
            bail!("unsupported protocol version {version} (expected {VERSION})");
        }
        let h = Header {
            c2s_len: u64_at(8),
            s2c_len: u64_at(16),
            seed: u64_at(24),
            max_write: u32_at(32),
            flags: u32_at(36),
        };
        if h.max_write == 0 || h.max_write > MAX_WRITE_LIMIT {
            bail!(
                "header max_write {} out of range 1..={MAX_WRITE_LIMIT}",
                h.max_write
            );
        }
        if h.flags != 0 {
            bail!("unsupported header flags 0x{:08x} (must be 0)", h.flags);
        }
        Ok(h)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    Mismatch = 1,
    Short = 2,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Mismatch => "mismatch",
            Status::Short => "short_read",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub status: Status,
    pub offset: u64,
    pub sha256: [u8; 32],
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0] = self.status as u8;
        b[1..9].copy_from_slice(&self.offset.to_le_bytes());
        b[9..41].copy_from_slice(&self.sha256);
        b
    }

    pub fn decode(b: &[u8; TRAILER_LEN]) -> Result<Trailer> {
        let status = match b[0] {
            0 => Status::Ok,
            1 => Status::Mismatch,
            2 => Status::Short,
            s => bail!(
                "bad trailer status byte {s}; trailer bytes: {}",
                crate::stream::hex(b)
            ),
        };
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[1..9]);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&b[9..41]);
        Ok(Trailer {
            status,
            offset: u64::from_le_bytes(off),
            sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_layout() {
        let h = Header {
            c2s_len: 0x0102_0304_0506_0708,
            s2c_len: 5,
            seed: u64::MAX,
            max_write: 65536,
            flags: 0,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], b"SPYB"); // 0x42595053 little-endian
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[32..36], &[0, 0, 1, 0]);
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn header_rejects_garbage() {
        let h = Header {
            c2s_len: 1,
            s2c_len: 1,
            seed: 1,
            max_write: 1,
            flags: 0,
        };
        let mut b = h.encode();
        b[0] ^= 1;
        assert!(
            Header::decode(&b)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut b = h.encode();
        b[4] = 2;
        assert!(
            Header::decode(&b)
                .unwrap_err()
                .to_string()
                .contains("version")
        );
        let mut b = h.encode();
        b[32..36].copy_from_slice(&0u32.to_le_bytes());
        assert!(Header::decode(&b).is_err());
        let mut b = h.encode();
        b[36] = 1;
        assert!(Header::decode(&b).is_err());
    }

    #[test]
    fn trailer_roundtrip() {
        let t = Trailer {
            status: Status::Mismatch,
            offset: 12345,
            sha256: [7; 32],
        };
        let b = t.encode();
        assert_eq!(b[0], 1);
        assert_eq!(Trailer::decode(&b).unwrap(), t);
        let mut b = b;
        b[0] = 9;
        assert!(Trailer::decode(&b).is_err());
    }
}
