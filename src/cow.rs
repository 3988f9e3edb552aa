//! Copy-on-write collections: the routing snapshot's maps, cheap to clone, cheap to
//! change one entry of.
//!
//! A published table is immutable and shared by every request in flight; a write makes
//! the next table from it. With plain hash maps that meant copying a million sandboxes
//! for one change. Here a map is a two-level radix of up to 64 × 64 small hash tables
//! (leaves) behind `Arc`s:
//!
//! ```text
//! CowMap ─Arc─► top [2^b] ─Arc─► dir [2^b] ─Arc─► leaf: HashTable<T>  (≤ 512 entries
//!         hash(key): bits 32.. pick the dir, 38.. the leaf; the leaf's own probe uses
//!         the low bits and the top seven, so the three never correlate
//! ```
//!
//! Cloning a map is one reference count. Changing one entry copies the path to it: the
//! top and one dir (2^b pointers each) and one leaf (a few hundred entries at most), so a
//! write costs the same on a thousand entries as on a million (`Arc::make_mut`: nothing
//! is copied while the map is not shared). A lookup hashes the key once and follows two
//! pointers into a small table: no allocation, no lock.
//!
//! A map starts as one leaf (small maps stay cache-friendly) and grows like a hash
//! table: past 512 entries per leaf on average it is re-spread over four times as many
//! leaves, up to 64 × 64 (that one write pays for the copy; amortised, a write stays
//! constant); a bulk load reserves its width up front.
//!
//! [`CowSlab`] is the same idea for objects addressed by a stable `u32` slot (chunks of
//! 256): references between objects of the snapshot are slots, not strings.

mod key;

pub use key::Key;

use hashbrown::HashTable;
use std::sync::Arc;

/// An entry of a [`CowMap`]: it carries its own key.
pub trait Keyed: Clone {
    /// The key, as bytes (ids and host names are ASCII).
    fn key(&self) -> &[u8];
}

/// Bits of the hash per level at full width (64 × 64 leaves).
const MAX_BITS: u32 = 6;
/// Entries per leaf, on average, past which a map grows.
const GROW_AT: usize = 512;

type Leaf<T> = HashTable<T>;
// Slices inline in their `Arc`s: one pointer per level on the lookup path.
type Dir<T> = [Arc<Leaf<T>>];
type Top<T> = [Arc<Dir<T>>];

/// The hasher of every map: fixed seeds keep lookups and iteration deterministic across
/// runs; flooding is not a concern since every key comes from the trusted routing state
/// (a request only looks keys up).
fn hasher() -> &'static ahash::RandomState {
    static H: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    H.get_or_init(|| ahash::RandomState::with_seeds(0x6d69_6f73, 0x6165_6467, 0x636f_7721, 0x6d61_7073))
}

/// The hash of `key` in every [`CowMap`].
#[inline]
pub fn hash(key: &[u8]) -> u64 {
    hasher().hash_one(key)
}

#[inline]
fn slots(h: u64, bits: u32) -> (usize, usize) {
    let mask = (1u64 << bits) - 1;
    (((h >> 32) & mask) as usize, ((h >> 38) & mask) as usize)
}

/// A hash map of [`Keyed`] entries, copied on write (see the module head).
pub struct CowMap<T: Keyed> {
    top: Arc<Top<T>>,
    len: usize,
    /// Hash bits per level: 2^bits dirs of 2^bits leaves.
    bits: u32,
}

impl<T: Keyed> Clone for CowMap<T> {
    fn clone(&self) -> Self {
        CowMap { top: self.top.clone(), len: self.len, bits: self.bits }
    }
}

impl<T: Keyed> Default for CowMap<T> {
    fn default() -> Self {
        CowMap::new()
    }
}

impl<T: Keyed + std::fmt::Debug> std::fmt::Debug for CowMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowMap").field("len", &self.len).finish()
    }
}

impl<T: Keyed> CowMap<T> {
    /// An empty map of one leaf.
    pub fn new() -> CowMap<T> {
        CowMap::with_bits(0)
    }

    /// An empty map at full width.
    #[cfg(test)]
    pub fn wide() -> CowMap<T> {
        CowMap::with_bits(MAX_BITS)
    }

    /// An empty map of 2^bits × 2^bits leaves; every slot shares one empty leaf until
    /// written.
    fn with_bits(bits: u32) -> CowMap<T> {
        let n = 1usize << bits;
        let leaf: Arc<Leaf<T>> = Arc::new(HashTable::new());
        let dir: Arc<Dir<T>> = vec![leaf; n].into();
        CowMap { top: vec![dir; n].into(), len: 0, bits }
    }

    /// Re-spreads the entries over 2^bits × 2^bits leaves.
    fn respread(&mut self, bits: u32) {
        let mut wider = CowMap::with_bits(bits);
        for e in self.iter() {
            wider.insert_unique(e.clone());
        }
        *self = wider;
    }

    /// Inserts an entry whose key is not in the map (no growth check).
    fn insert_unique(&mut self, v: T) {
        let h = hash(v.key());
        self.leaf_mut(h).insert_unique(h, v, |e| hash(e.key()));
        self.len += 1;
    }

    /// The width a map of `n` entries should have.
    fn bits_for(n: usize) -> u32 {
        let mut bits = 0;
        while bits < MAX_BITS && n > GROW_AT << (2 * bits) {
            bits += 1;
        }
        bits
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry with `key`. Allocation-free.
    #[inline]
    pub fn get(&self, key: &[u8]) -> Option<&T> {
        let h = hash(key);
        let (d, l) = slots(h, self.bits);
        self.top[d][l].find(h, |e| e.key() == key)
    }

    /// Whether an entry has `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// The leaf `h` falls in, copied first if it is shared.
    fn leaf_mut(&mut self, h: u64) -> &mut Leaf<T> {
        let (d, l) = slots(h, self.bits);
        let dir = &mut Arc::make_mut(&mut self.top)[d];
        let leaf = &mut Arc::make_mut(dir)[l];
        Arc::make_mut(leaf)
    }

    /// Inserts `v`, returning the entry it replaces.
    pub fn insert(&mut self, v: T) -> Option<T> {
        let h = hash(v.key());
        let leaf = self.leaf_mut(h);
        match leaf.find_mut(h, |e| e.key() == v.key()) {
            Some(slot) => Some(std::mem::replace(slot, v)),
            None => {
                leaf.insert_unique(h, v, |e| hash(e.key()));
                self.len += 1;
                if self.bits < MAX_BITS && self.len > GROW_AT << (2 * self.bits) {
                    self.respread(self.bits + 1);
                }
                None
            }
        }
    }

    /// Removes the entry with `key`.
    pub fn remove(&mut self, key: &[u8]) -> Option<T> {
        let h = hash(key);
        // Look before copying anything: removing an absent key changes nothing.
        self.get(key)?;
        let leaf = self.leaf_mut(h);
        let (v, _) = leaf.find_entry(h, |e| e.key() == key).ok()?.remove();
        self.len -= 1;
        Some(v)
    }

    /// Every entry, in hash order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.top.iter().flat_map(|dir| dir.iter().flat_map(|leaf| leaf.iter()))
    }

    /// Reserves room for about `n` more entries spread evenly (bulk loads).
    pub fn reserve(&mut self, n: usize) {
        let bits = CowMap::<T>::bits_for(self.len + n).max(self.bits);
        if bits > self.bits {
            self.respread(bits);
        }
        let per_leaf = (self.len + n) / (1usize << (2 * bits)) + 1;
        for dir in Arc::make_mut(&mut self.top).iter_mut() {
            for leaf in Arc::make_mut(dir).iter_mut() {
                let leaf = Arc::make_mut(leaf);
                leaf.reserve(per_leaf.saturating_sub(leaf.len()), |e| hash(e.key()));
            }
        }
    }
}

const CHUNK: usize = 256;

/// Objects in stable `u32` slots, copied on write in chunks of 256. The caller chooses
/// slots (and keeps track of free ones).
pub struct CowSlab<T: Clone> {
    chunks: Arc<Vec<Arc<Vec<Option<T>>>>>,
    len: usize,
}

impl<T: Clone> Clone for CowSlab<T> {
    fn clone(&self) -> Self {
        CowSlab { chunks: self.chunks.clone(), len: self.len }
    }
}

impl<T: Clone> Default for CowSlab<T> {
    fn default() -> Self {
        CowSlab { chunks: Arc::new(Vec::new()), len: 0 }
    }
}

impl<T: Clone> std::fmt::Debug for CowSlab<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowSlab").field("len", &self.len).finish()
    }
}

impl<T: Clone> CowSlab<T> {
    /// The object in `slot`.
    #[inline]
    pub fn get(&self, slot: u32) -> Option<&T> {
        let s = slot as usize;
        self.chunks.get(s / CHUNK)?.get(s % CHUNK)?.as_ref()
    }

    /// Puts `v` in `slot` (`None` empties it), returning what was there.
    pub fn set(&mut self, slot: u32, v: Option<T>) -> Option<T> {
        let s = slot as usize;
        let (c, i) = (s / CHUNK, s % CHUNK);
        if v.is_none() && self.get(slot).is_none() {
            return None;
        }
        let chunks = Arc::make_mut(&mut self.chunks);
        while chunks.len() <= c {
            chunks.push(Arc::new(vec![None; CHUNK]));
        }
        let old = std::mem::replace(&mut Arc::make_mut(&mut chunks[c])[i], v);
        match (&old, &chunks[c][i]) {
            (None, Some(_)) => self.len += 1,
            (Some(_), None) => self.len -= 1,
            _ => {}
        }
        old
    }

    /// Number of filled slots.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the highest slot that may be filled.
    pub fn slots(&self) -> u32 {
        (self.chunks.len() * CHUNK) as u32
    }

    /// Every filled slot and its object, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .flat_map(|(c, chunk)| chunk.iter().enumerate().filter_map(move |(i, v)| v.as_ref().map(|v| ((c * CHUNK + i) as u32, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Clone, Debug, PartialEq)]
    struct E(String, u32);

    impl Keyed for E {
        fn key(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }

    #[test]
    fn cow_map_behaves_like_a_hash_map_and_snapshots_never_change() {
        let mut map = CowMap::new();
        let mut model: HashMap<String, u32> = HashMap::new();
        let mut snapshots: Vec<(CowMap<E>, HashMap<String, u32>)> = Vec::new();
        // A deterministic mix of inserts, replacements and removals over 3,000 keys.
        let mut x: u64 = 0x9e37_79b9;
        for step in 0..40_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = format!("k{}", x % 3000);
            match x % 5 {
                0..=2 => assert_eq!(map.insert(E(k.clone(), step)).map(|e| e.1), model.insert(k, step)),
                _ => assert_eq!(map.remove(k.as_bytes()).map(|e| e.1), model.remove(&k)),
            }
            assert_eq!(map.len(), model.len());
            if step % 5000 == 0 {
                snapshots.push((map.clone(), model.clone()));
            }
        }
        for (k, v) in &model {
            assert_eq!(map.get(k.as_bytes()).map(|e| e.1), Some(*v));
        }
        assert!(map.bits >= 1, "3,000 keys spread over more than one leaf");
        assert_eq!(map.iter().count(), model.len());
        assert!(map.get(b"absent").is_none() && map.remove(b"absent").is_none());
        // Every clone taken along the way still holds exactly what it held then.
        for (snap, m) in &snapshots {
            assert_eq!(snap.len(), m.len());
            for e in snap.iter() {
                assert_eq!(m.get(&e.0), Some(&e.1));
            }
        }
    }

    #[test]
    fn a_write_to_a_clone_copies_one_path_only() {
        const FAN: usize = 1 << MAX_BITS;
        let mut a = CowMap::wide();
        for i in 0..10_000 {
            a.insert(E(format!("s{i}"), i));
        }
        let mut b = a.clone();
        b.insert(E("s1".into(), 99));
        assert_eq!(a.get(b"s1").map(|e| e.1), Some(1));
        assert_eq!(b.get(b"s1").map(|e| e.1), Some(99));
        assert_eq!(a.bits, MAX_BITS);
        // All but one dir, and all but one leaf in it, are still shared.
        let shared_dirs = (0..FAN).filter(|&d| Arc::ptr_eq(&a.top[d], &b.top[d])).count();
        assert_eq!(shared_dirs, FAN - 1);
        let d = (0..FAN).find(|&d| !Arc::ptr_eq(&a.top[d], &b.top[d])).expect("one copied dir");
        let shared_leaves = (0..FAN).filter(|&l| Arc::ptr_eq(&a.top[d][l], &b.top[d][l])).count();
        assert_eq!(shared_leaves, FAN - 1);
    }

    #[test]
    fn cow_slab_slots() {
        let mut s: CowSlab<String> = CowSlab::default();
        assert_eq!(s.set(3, Some("a".into())), None);
        assert_eq!(s.set(700, Some("b".into())), None);
        let snap = s.clone();
        assert_eq!(s.set(3, None), Some("a".into()));
        assert_eq!((s.len(), snap.len()), (1, 2));
        assert_eq!(snap.get(3).map(String::as_str), Some("a"));
        assert_eq!(s.get(3), None);
        assert_eq!(s.iter().map(|(i, v)| (i, v.as_str())).collect::<Vec<_>>(), [(700, "b")]);
        assert_eq!(s.set(5, None), None);
        assert!(s.slots() >= 701 && s.get(100_000).is_none());
    }
}
