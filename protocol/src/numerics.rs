//! The numerics version: which results a server's compute kernels produce, bit for bit.
//!
//! Nodes of one numerics version compute bit-identical outputs from the same inputs,
//! so one server's output can be checked against another's exactly. A kernel change
//! that alters rounding (a different summation order, a fused operation, another
//! conversion) moves the low bits of results: it must not look like a lie, and a
//! route should not mix versions when it can avoid it. Servers announce the version
//! they run and clients route over servers of their own version first.
//!
//! Bump [`NUMERICS_VERSION`] whenever any kernel's rounding or summation order
//! changes, in any SIMD path or the scalar one; a change that keeps every result bit
//! for bit (speed, memory layout with the same order of operations) does not bump it.

/// The numerics version of this release's kernels.
pub const NUMERICS_VERSION: u32 = 1;
