//! A map key that keeps short keys inline.
//!
//! Sandbox ids and most host names are short; storing them inside the hash table's
//! bucket instead of behind a `Box` saves one dependent memory load (a cache miss on a
//! table of a million sandboxes) per lookup, and ~24 bytes of heap per entry.

const INLINE: usize = 22;

/// Bytes (usually text), inline up to 22 bytes, boxed beyond.
#[derive(Clone)]
pub enum Key {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    /// A key of arbitrary bytes.
    pub fn from_bytes(b: &[u8]) -> Key {
        if b.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..b.len()].copy_from_slice(b);
            Key::Inline { len: b.len() as u8, buf }
        } else {
            Key::Heap(b.into())
        }
    }

    /// The key's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, buf } => &buf[..*len as usize],
            Key::Heap(b) => b,
        }
    }

    /// The key as text (empty for a key that is not UTF-8; keys made from `&str` are).
    pub fn as_str(&self) -> &str {
        // A few nanoseconds on short ASCII, and no `unsafe` in this module.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::from_bytes(s.as_bytes())
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        String::from_utf8_lossy(self.as_bytes()).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_heap_keys() {
        let long = "a-rather-long-custom-domain.customer-example.com";
        assert!(matches!(Key::from("exactly-22-bytes-long!"), Key::Inline { .. }));
        assert!(matches!(Key::from(long), Key::Heap(_)));
        assert_eq!(Key::from(long).as_str(), long);
        assert_eq!(Key::from("abc12345").as_bytes(), b"abc12345");
        assert_eq!(Key::from(""), Key::from_bytes(b""));
        assert_eq!(Key::from_bytes(&[0, 0, 0, 1, b'a']).as_bytes(), &[0, 0, 0, 1, b'a']);
        assert_ne!(Key::from("abc1234"), Key::from("abc12345"));
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }
}
