//! A map key that keeps short strings inline.
//!
//! Sandbox ids and most host names are short; storing them inside the hash table's
//! bucket instead of behind a `Box<str>` saves one dependent memory load (a cache miss
//! on a table of a million sandboxes) per lookup, and ~24 bytes of heap per entry.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

const INLINE: usize = 22;

/// A string, inline up to 22 bytes, boxed beyond.
#[derive(Clone)]
pub enum Key {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<str>),
}

impl Key {
    /// The key as text.
    pub fn as_str(&self) -> &str {
        match self {
            // Built only from `&str` (see `From`), so the bytes are UTF-8; the check is
            // a few nanoseconds on short ASCII and keeps this module free of `unsafe`.
            Key::Inline { len, buf } => std::str::from_utf8(&buf[..*len as usize]).unwrap_or_default(),
            Key::Heap(s) => s,
        }
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        if s.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            Key::Inline { len: s.len() as u8, buf }
        } else {
            Key::Heap(s.into())
        }
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Must hash exactly as `str` does, for lookups by `&str`.
        self.as_str().hash(h)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Key {}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn inline_and_heap_keys_find_by_str() {
        let long = "a-rather-long-custom-domain.customer-example.com";
        let mut m: HashMap<Key, u32> = HashMap::new();
        m.insert(Key::from("abc12345"), 1);
        m.insert(Key::from(long), 2);
        m.insert(Key::from(""), 3);
        m.insert(Key::from("exactly-22-bytes-long!"), 4);
        assert!(matches!(Key::from("exactly-22-bytes-long!"), Key::Inline { .. }));
        assert!(matches!(Key::from(long), Key::Heap(_)));
        assert_eq!(m.get("abc12345"), Some(&1));
        assert_eq!(m.get(long), Some(&2));
        assert_eq!(m.get(""), Some(&3));
        assert_eq!(m.get("exactly-22-bytes-long!"), Some(&4));
        assert_eq!(m.get("abc1234"), None);
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }
}
