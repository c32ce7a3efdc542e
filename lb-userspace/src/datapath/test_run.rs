//! Running a frame through a loaded program with BPF_PROG_TEST_RUN: how the clock is
//! calibrated, how `lb-agent trace` explains a decision, and how the packet tests and the
//! bench drive the real programs.

use super::error::{Context, Result};
use aya::programs::{TestRun, TestRunOptions, TestRunResult};

/// Runs one frame through a program with BPF_PROG_TEST_RUN: (verdict, output frame). With
/// `ingress_ifindex`, an XDP program sees the frame as arriving on that interface.
pub fn run_frame<P>(prog: &P, frame: &[u8], ingress_ifindex: Option<u32>) -> Result<(u32, Vec<u8>)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; data_end must be the frame's length.
    let mut ctx = [0u8; 24];
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if let Some(i) = ingress_ifindex {
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&i.to_ne_bytes());
        opts.ctx_in = Some(&ctx);
    }
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}
