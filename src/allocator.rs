//! The global allocator: mimalloc, asked the way C's `malloc` is whenever that already
//! gives the alignment a layout needs.
//!
//! The `mimalloc` crate's `GlobalAlloc` calls `mi_malloc_aligned` for every allocation.
//! In mimalloc 3 that call has a fast path only for blocks up to 1 KiB taken from a free
//! list that happens to be aligned; everything else — a boxed request future, a header
//! map's table, a read buffer — falls to `mi_malloc_aligned`'s generic path, which
//! over-allocates by `align - 1` bytes and computes the block back (callgrind, scenario
//! 1 of `benches/load`: 20 such allocations per proxied request, ~190 instructions
//! each). `mi_malloc` already returns blocks aligned to 16 bytes from 16 bytes up (its
//! size classes are multiples of two words on 64-bit targets, `MI_ALIGN2W`) and to the
//! word below that, which is the rule Rust's own `System` allocator applies to C's
//! `malloc`: alignment ≤ 16 and ≤ the size. Larger alignments (tokio's 128-byte task
//! cells and channels) keep `mi_malloc_aligned`; freeing is `mi_free` for both.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;
use libmimalloc_sys as mi;

/// The alignment `mi_malloc` guarantees for blocks of at least this many bytes
/// (`MI_MAX_ALIGN_SIZE`); below it, the size rounded to the word.
const MALLOC_ALIGN: usize = 16;

/// Whether `mi_malloc(size)` is aligned enough for a layout of `align` and `size`.
#[inline(always)]
fn malloc_suffices(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

/// mimalloc as the process's allocator (`#[global_allocator]` in the binaries).
pub struct EdgeAlloc;

unsafe impl GlobalAlloc for EdgeAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if malloc_suffices(layout.align(), layout.size()) {
            unsafe { mi::mi_malloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if malloc_suffices(layout.align(), layout.size()) {
            unsafe { mi::mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if malloc_suffices(layout.align(), new_size) {
            unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe { mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size from 1 to 1100 bytes, every 97th to 9000 and a few large ones, at every
    /// alignment up to 4 KiB: the block is aligned, zeroed when asked, writable to its
    /// end, and keeps its bytes through reallocations that cross between the two paths
    /// (a size under the alignment and one over it).
    #[test]
    fn blocks_are_aligned_zeroed_and_keep_their_bytes_through_realloc() {
        let a = EdgeAlloc;
        let sizes: Vec<usize> = (1..=1100).chain((1101..9000).step_by(97)).chain([16_384, 65_537, 300_001, 4 << 20]).collect();
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for &size in &sizes {
                let layout = Layout::from_size_align(size, align).expect("layout");
                unsafe {
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null(), "zeroed {size}/{align}");
                    assert_eq!(z as usize % align, 0, "zeroed {size}/{align} misaligned");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0), "zeroed {size}/{align} not zero");
                    a.dealloc(z, layout);

                    let p = a.alloc(layout);
                    assert!(!p.is_null(), "alloc {size}/{align}");
                    assert_eq!(p as usize % align, 0, "alloc {size}/{align} misaligned");
                    for i in 0..size {
                        *p.add(i) = (i % 251) as u8;
                    }
                    // Shrink to just over half the alignment (under it, so the aligned
                    // call for alignments of 2 and more) or to half the size, then grow.
                    let small = if size > align { align.max(1) / 2 + 1 } else { size / 2 + 1 };
                    let q = a.realloc(p, layout, small);
                    assert!(!q.is_null() && q as usize % align == 0, "shrink {size}/{align} -> {small}");
                    let kept = small.min(size);
                    for i in 0..kept {
                        assert_eq!(*q.add(i), (i % 251) as u8, "shrink {size}/{align} lost byte {i}");
                    }
                    let small_layout = Layout::from_size_align(small, align).expect("layout");
                    let grown = size * 2 + 17;
                    let r = a.realloc(q, small_layout, grown);
                    assert!(!r.is_null() && r as usize % align == 0, "grow {small}/{align} -> {grown}");
                    for i in 0..kept {
                        assert_eq!(*r.add(i), (i % 251) as u8, "grow {small}/{align} lost byte {i}");
                    }
                    *r.add(grown - 1) = 7;
                    a.dealloc(r, Layout::from_size_align(grown, align).expect("layout"));
                }
            }
        }
    }

    /// The rule itself: `mi_malloc` only where its own guarantee covers the layout.
    #[test]
    fn malloc_is_used_only_where_its_alignment_suffices() {
        assert!(malloc_suffices(8, 8) && malloc_suffices(16, 16) && malloc_suffices(16, 9000) && malloc_suffices(1, 1));
        assert!(!malloc_suffices(16, 8), "an 8-byte block is only word-aligned");
        assert!(!malloc_suffices(32, 4096) && !malloc_suffices(128, 384), "over 16 bytes: the aligned call");
    }
}
