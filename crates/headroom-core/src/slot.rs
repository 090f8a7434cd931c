//! Redis Cluster hash slots, shared by the Redis backends (to group pipelines by slot) and
//! the slot router of `headroom-shard`.

/// The number of Redis Cluster hash slots.
pub const CLUSTER_SLOTS: u16 = 16_384;

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of the part between
/// the first `{` and the next `}` when that part is non-empty, modulo 16384.
///
/// ```
/// use headroom_core::slot::cluster_slot;
///
/// assert_eq!(cluster_slot(b"123456789"), 0x31C3);
/// assert_eq!(cluster_slot(b"{user1}.following"), cluster_slot(b"{user1}.followers"));
/// ```
#[inline]
pub fn cluster_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % CLUSTER_SLOTS
}

/// The part of `key` that decides its slot: its first non-empty `{hash tag}`, or all of it.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}')
            && len > 0
        {
            return &rest[..len];
        }
    }
    key
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), as used by Redis Cluster.
///
/// ```
/// assert_eq!(headroom_core::slot::crc16(b"123456789"), 0x31C3);
/// ```
pub fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_the_cluster_specification() {
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no-tag"), b"no-tag");
        assert_eq!(hash_tag(b"{unclosed"), b"{unclosed");
    }
}
