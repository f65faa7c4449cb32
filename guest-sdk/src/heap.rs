//! The allocator of workers built for `wasm32-unknown-unknown`.
//!
//! The standard library's allocator on that target takes every byte of its
//! heap with `memory.grow`, so a fresh instance grows its memory on its first
//! allocation, and the host pays two `mprotect` calls per request for it. This
//! allocator runs the same dlmalloc, but first hands out the free pages of the
//! initial memory between the end of the data (`__heap_base`) and the end of
//! the memory, which the build sizes with `--initial-memory`. Only a worker
//! that needs more grows its memory.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// WebAssembly's page size.
const PAGE: usize = 64 << 10;

extern "C" {
    /// The first byte after the stack and the data, set by the linker.
    static __heap_base: u8;
}

/// Gives dlmalloc its memory: the initial memory's free pages once, then
/// pages from `memory.grow`.
struct Pages {
    initial_taken: UnsafeCell<bool>,
}

// SAFETY: a worker instance has one thread.
unsafe impl Send for Pages {}

// SAFETY: every region returned is unused memory of this instance that no
// other code touches, and the flags claim nothing dlmalloc must not assume.
unsafe impl dlmalloc::Allocator for Pages {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        // SAFETY: one thread, so no other access to the flag is live.
        let initial_taken = unsafe { &mut *self.initial_taken.get() };
        if !*initial_taken {
            *initial_taken = true;
            // The linker defines `__heap_base`; only its address is taken.
            let base = ptr::addr_of!(__heap_base) as usize;
            let end = core::arch::wasm32::memory_size(0) * PAGE;
            if end > base && end - base >= size {
                return (base as *mut u8, end - base, 0);
            }
        }
        let pages = size.div_ceil(PAGE);
        let previous = core::arch::wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return (ptr::null_mut(), 0, 0);
        }
        ((previous * PAGE) as *mut u8, pages * PAGE, 0)
    }

    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        // A fresh instance's initial memory past its data is zeroed, as is
        // every page `memory.grow` adds.
        true
    }

    fn page_size(&self) -> usize {
        PAGE
    }
}

/// The global allocator: dlmalloc over [`Pages`].
pub struct Heap(UnsafeCell<dlmalloc::Dlmalloc<Pages>>);

// SAFETY: a worker instance has one thread.
unsafe impl Sync for Heap {}

impl Heap {
    /// Creates the allocator; it takes no memory until the first allocation.
    pub const fn new() -> Heap {
        Heap(UnsafeCell::new(dlmalloc::Dlmalloc::new_with_allocator(
            Pages {
                initial_taken: UnsafeCell::new(false),
            },
        )))
    }
}

// SAFETY: dlmalloc's methods keep GlobalAlloc's contracts, and one thread
// means no two calls overlap.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        (*self.0.get()).malloc(layout.size(), layout.align())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        (*self.0.get()).calloc(layout.size(), layout.align())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        (*self.0.get()).free(ptr, layout.size(), layout.align())
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        (*self.0.get()).realloc(ptr, layout.size(), layout.align(), new_size)
    }
}

#[global_allocator]
static HEAP: Heap = Heap::new();
