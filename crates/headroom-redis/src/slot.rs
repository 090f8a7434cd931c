/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of its first non-empty
/// `{hash tag}`, modulo 16384.
///
/// ```
/// use headroom_redis::cluster_slot;
/// assert_eq!(cluster_slot(b"123456789"), 0x31C3);
/// assert_eq!(cluster_slot(b"{user1}.following"), cluster_slot(b"{user1}.followers"));
/// ```
pub fn cluster_slot(key: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key)) % 16384
}

fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

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
