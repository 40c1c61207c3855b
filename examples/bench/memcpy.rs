//! The copy ceiling: `memcpy` (`copy_from_slice`) bandwidth in 64 KiB blocks between
//! page-aligned buffers, measured in the same run as the device; and the same with the
//! destination 28 bytes past the source modulo 4 KiB (where the old simulated driver's TX copy
//! sat), which shows whether this machine's `memcpy` suffers from 4 KiB aliasing.

use std::hint::black_box;
use std::time::Instant;

use crate::cpu::Cpu;
use crate::{Aligned, Sample};

const BLOCK: usize = 64 * 1024;

/// Copies `bytes` in 64 KiB blocks, cycling over `span` bytes of source and destination
/// (64 KiB: the same block again and again, in cache; 32 MiB: beyond the caches), the
/// destination `dst_off` bytes into its page.
pub fn run(span: usize, dst_off: usize, bytes: u64) -> Result<Sample, String> {
    let src = Aligned::new(span, 0);
    let mut dst = Aligned::new(span, dst_off);
    let blocks = span / BLOCK;
    let n = bytes / BLOCK as u64;
    // One pass first, so that every page is mapped before the clock starts.
    dst.as_mut_slice().copy_from_slice(src.as_slice());
    let start = Instant::now();
    for i in 0..n {
        let at = (i as usize % blocks) * BLOCK;
        dst.as_mut_slice()[at..at + BLOCK].copy_from_slice(&src.as_slice()[at..at + BLOCK]);
        black_box(&mut dst);
    }
    let wall = start.elapsed();
    Ok(Sample {
        wall,
        amount: (n * BLOCK as u64) as f64,
        cpu: Cpu {
            dev: f64::NAN,
            guest: wall.as_secs_f64(),
            process: f64::NAN,
        },
        extra: Vec::new(),
    })
}
