//! Memory for weight blocks. Decode streams every weight of a shard once per token, so
//! how the weights are mapped matters: in pages of 4 KiB a node's 22 MB of weights
//! span 5,600 pages, far more than the TLB holds, and every page costs a page walk
//! (two-dimensional under a hypervisor). Matrices are therefore placed one after
//! another in large regions aligned to 2 MiB that Linux is asked to back with
//! transparent huge pages (`MADV_HUGEPAGE`; honoured when the system's setting is
//! `madvise` or `always`, ignored when it is `never` or on other systems).
//!
//! A region lives as long as a matrix placed in it (a node that drops its layers
//! gives their memory back); a matrix never moves or changes after it is placed.

// Raw memory: mapping regions and handing out immutable slices of them.
#![allow(unsafe_code)]

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

/// The huge page size of x86-64 and of arm64 with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;
/// Matrices smaller than half of this share regions of this size.
const REGION_BYTES: usize = 32 << 20;
/// Every placed slice starts on a cache line (the kernels' 64-byte loads).
const ALIGN: usize = 64;

/// The region that small matrices are placed in next, and the bytes of it in use.
/// Held weakly: a region lives only as long as the matrices placed in it.
static OPEN: Mutex<Option<(Weak<Region>, usize)>> = Mutex::new(None);

/// Immutable blocks placed in a region; dereferences to a slice.
pub struct Blocks<B> {
    /// Keeps the memory mapped; `None` for an empty slice.
    _region: Option<Arc<Region>>,
    ptr: NonNull<B>,
    len: usize,
}

// SAFETY: a finished `Blocks` is a shared, never mutated slice of `B`s (its memory is
// written only through the `Placing` that holds it before it is finished), so it may
// be sent and shared as `&[B]` may.
unsafe impl<B: Sync> Send for Blocks<B> {}
unsafe impl<B: Sync> Sync for Blocks<B> {}

impl<B: Copy> Blocks<B> {
    /// A copy of `items` in huge-page-backed memory.
    #[cfg(test)]
    pub fn place(items: &[B]) -> Self {
        let mut placing = Placing::new(items.len());
        placing.extend(items);
        placing.finish()
    }
}

/// [`Blocks`] being written, in order, straight into their place (no second copy of a
/// matrix while it loads).
pub struct Placing<B> {
    /// Not to be read until `written == blocks.len`.
    blocks: Blocks<B>,
    written: usize,
}

impl<B: Copy> Placing<B> {
    /// Room for `len` blocks.
    pub fn new(len: usize) -> Self {
        const { assert!(std::mem::align_of::<B>() <= ALIGN) };
        let bytes = len
            .checked_mul(std::mem::size_of::<B>())
            .expect("blocks fit in memory");
        let (region, ptr) = match bytes {
            0 => (None, NonNull::dangling()),
            _ => {
                let (region, offset) = reserve(bytes);
                // SAFETY: `reserve` gave `bytes` unused bytes of `region` at `offset`,
                // aligned to `ALIGN` (which `B`'s alignment divides).
                let ptr = unsafe { NonNull::new_unchecked(region.ptr.as_ptr().add(offset)) };
                (Some(region), ptr.cast::<B>())
            }
        };
        let blocks = Blocks {
            _region: region,
            ptr,
            len,
        };
        Self { blocks, written: 0 }
    }

    /// Appends `items`; panics past the length given to [`Placing::new`].
    pub fn extend(&mut self, items: &[B]) {
        let Self { blocks, written } = self;
        assert!(
            items.len() <= blocks.len - *written,
            "more blocks than reserved"
        );
        // SAFETY: in bounds (checked above) of the space reserved for `len` blocks
        // (dangling but aligned when it is empty), which only this `Placing` writes;
        // `items` is another allocation.
        unsafe {
            let dst = blocks.ptr.as_ptr().add(*written);
            std::ptr::copy_nonoverlapping(items.as_ptr(), dst, items.len());
        }
        *written += items.len();
    }

    /// The blocks, once all are written; panics if some are missing.
    pub fn finish(self) -> Blocks<B> {
        assert_eq!(self.written, self.blocks.len, "fewer blocks than reserved");
        self.blocks
    }
}

impl<B> Deref for Blocks<B> {
    type Target = [B];

    fn deref(&self) -> &[B] {
        // SAFETY: `ptr` points at `len` initialised `B`s (or dangles for `len == 0`,
        // or a zero-sized `B`), kept alive by `_region` and never written again.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

/// Where `bytes` go: the open region if they fit, a fresh open region if they are
/// small, a region of their own if they are large.
fn reserve(bytes: usize) -> (Arc<Region>, usize) {
    if bytes > REGION_BYTES / 2 {
        return (Arc::new(Region::new(bytes)), 0);
    }
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((weak, used)) = open.as_mut() {
        let offset = used.next_multiple_of(ALIGN);
        if let Some(region) = weak.upgrade().filter(|r| offset + bytes <= r.len) {
            *used = offset + bytes;
            return (region, offset);
        }
    }
    let region = Arc::new(Region::new(REGION_BYTES));
    *open = Some((Arc::downgrade(&region), bytes));
    (region, 0)
}

/// A mapping of whole huge pages, aligned to a huge page. Pages are committed when
/// first written, so the unused tail of a region costs address space only.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a region is plain memory; who may write which part of it is `Blocks`' business.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(bytes: usize) -> Self {
        let len = bytes.next_multiple_of(HUGE_PAGE);
        Self { ptr: map(len), len }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        unmap(self.ptr, self.len);
    }
}

fn out_of_memory(len: usize) -> ! {
    let layout = std::alloc::Layout::from_size_align(len, HUGE_PAGE)
        .unwrap_or(std::alloc::Layout::new::<u8>());
    std::alloc::handle_alloc_error(layout)
}

/// `len` bytes (a multiple of [`HUGE_PAGE`]) aligned to a huge page and advised for
/// transparent huge pages: mapped with one huge page to spare, then trimmed.
#[cfg(target_os = "linux")]
fn map(len: usize) -> NonNull<u8> {
    let span = len + HUGE_PAGE;
    // SAFETY: an anonymous private mapping of fresh memory; the parts outside the
    // aligned `len` bytes are unmapped again and never used.
    unsafe {
        let raw = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if raw == libc::MAP_FAILED {
            out_of_memory(len);
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        if head > 0 {
            libc::munmap(raw, head);
        }
        let tail = span - head - len;
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        // Refused where transparent huge pages are off: small pages then, as before.
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        NonNull::new_unchecked(aligned as *mut u8)
    }
}

#[cfg(target_os = "linux")]
fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: `ptr..ptr + len` is a mapping made by `map` and no longer referenced.
    unsafe {
        libc::munmap(ptr.as_ptr().cast(), len);
    }
}

#[cfg(not(target_os = "linux"))]
fn map(len: usize) -> NonNull<u8> {
    let layout =
        std::alloc::Layout::from_size_align(len, HUGE_PAGE).unwrap_or_else(|_| out_of_memory(len));
    // SAFETY: `layout` has a non-zero size (callers map at least one huge page).
    NonNull::new(unsafe { std::alloc::alloc(layout) }).unwrap_or_else(|| out_of_memory(len))
}

#[cfg(not(target_os = "linux"))]
fn unmap(ptr: NonNull<u8>, len: usize) {
    let layout = std::alloc::Layout::from_size_align(len, HUGE_PAGE).expect("mapped before");
    // SAFETY: allocated by `map` with this layout and no longer referenced.
    unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_blocks_keep_their_values_and_alignment() {
        let small: Vec<u32> = (0..1000).collect();
        let large: Vec<u64> = (0..(REGION_BYTES as u64 / 8 / 2 + 1)).collect();
        let a = Blocks::place(&small);
        let b = Blocks::place(&large);
        let c = Blocks::place(&small[..3]);
        let empty = Blocks::<u32>::place(&[]);
        assert_eq!(&*a, &small[..]);
        assert_eq!(&*b, &large[..]);
        assert_eq!(&*c, &small[..3]);
        assert!(empty.is_empty());
        for p in [
            a.as_ptr() as usize,
            b.as_ptr() as usize,
            c.as_ptr() as usize,
        ] {
            assert_eq!(p % ALIGN, 0);
        }
        // A large slice gets a region of its own, starting on a huge page.
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        drop(a);
        // What was placed after a dropped slice in the same region stays intact.
        assert_eq!(&*c, &small[..3]);
    }

    /// The `THPeligible` flag of the mapping holding `addr`, from `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn huge_page_eligible(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flag) = line.strip_prefix("THPeligible:") {
                    return Some(flag.trim() == "1");
                }
            }
        }
        None
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn regions_are_advised_for_huge_pages_where_the_system_offers_them() {
        let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let placed = Blocks::place(&vec![7u8; REGION_BYTES]);
        let eligible = huge_page_eligible(placed.as_ptr() as usize);
        if setting.contains("[madvise]") || setting.contains("[always]") {
            assert_eq!(eligible, Some(true), "setting {setting:?}");
        } else {
            eprintln!("transparent huge pages are off here ({setting:?}): not checked");
        }
    }

    #[test]
    fn placing_from_many_threads_gives_disjoint_copies() {
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                std::thread::spawn(move || {
                    (0..200u32)
                        .map(|i| {
                            let items: Vec<u32> =
                                (0..(i % 37 + 1)).map(|j| t << 24 | i << 8 | j).collect();
                            (Blocks::place(&items), items)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for t in threads {
            for (placed, items) in t.join().unwrap() {
                assert_eq!(&*placed, &items[..]);
            }
        }
    }
}
