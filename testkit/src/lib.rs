//! Shared pieces of the privileged tests: packet building, a BPF datapath harness for
//! BPF_PROG_TEST_RUN, and the network-namespace lab.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

pub mod apiserver;
pub mod cluster;
pub mod lab;
pub mod netns;
pub use lb_userspace::cli::frame;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Result};
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use lb_common::{config, program_names, DEFAULT_MAGLEV_SIZE};
use lb_control::{
    reconcile::Reconciler,
    source::manifests::parse_file,
    translate::{translate, NodeInfo},
};
use lb_userspace::datapath::{test_run::run_frame, Datapath, MapSizes, PinnedMaps};

/// The agent's default SNAT port range.
pub const SNAT_PORTS: (u16, u16) = (61000, 65535);

/// Privileged tests need root; say so instead of failing obscurely.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (BPF, network namespaces): run it as root"
    );
}

/// A directory on the bpffs, removed (with every pin in it) when dropped.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/lb-test-{tag}-{}-{n}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real BPF object with its maps programmed through the agent's own control plane.
pub struct Harness {
    pub datapath: Datapath,
    pub reconciler: Reconciler<PinnedMaps>,
    pub node: NodeInfo,
    // Last, so the pins go after the handles.
    pub pin: PinDir,
}

impl Harness {
    pub fn new(node: NodeInfo) -> Result<Harness> {
        require_root();
        let pin = PinDir::new("pkt");
        let mut datapath = Datapath::load(
            pin.path(),
            MapSizes {
                conntrack: 65536,
                ..Default::default()
            },
        )?;
        // As the agent configures it (the reconciler reads the Maglev size).
        let node_addr = node
            .addresses
            .iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(a) => Some(u32::from_ne_bytes(a.octets())),
                std::net::IpAddr::V6(_) => None,
            })
            .unwrap_or(0);
        for (index, value) in [
            (config::SNAT_PORT_MIN, u32::from(SNAT_PORTS.0)),
            (config::SNAT_PORT_MAX, u32::from(SNAT_PORTS.1)),
            (config::MAGLEV_SIZE, DEFAULT_MAGLEV_SIZE),
            (config::NODE_ADDR, node_addr),
        ] {
            datapath.set_config(index, value)?;
        }
        let reconciler = Reconciler::new(PinnedMaps::open(pin.path())?)?;
        Ok(Harness {
            datapath,
            reconciler,
            node,
            pin,
        })
    }

    /// Programs the maps from manifests, as `lb-agent run --manifests` would.
    pub fn program(&mut self, yaml: &str) -> Result<()> {
        let objects = parse_file(Path::new("fixture.yaml"), yaml)?;
        let t = translate(&objects, &self.node);
        if !t.warnings.is_empty() {
            bail!("translation warnings: {:?}", t.warnings);
        }
        self.reconciler.apply(&t.desired)?;
        Ok(())
    }

    /// Runs one frame through the XDP program: (XDP verdict, output frame).
    pub fn run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_frame(self.datapath.xdp(), frame, None).map_err(Into::into)
    }

    /// Runs one frame through the XDP program as if it came in on interface `ifindex`.
    pub fn run_from(&self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_frame(self.datapath.xdp(), frame, Some(ifindex)).map_err(Into::into)
    }

    /// Runs one frame through the pod interfaces' program (`lb_tc_pod`), as sent by a pod:
    /// (TC verdict, output frame).
    pub fn run_pod(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_frame(self.datapath.tc_pod(), frame, None).map_err(Into::into)
    }

    /// Runs one frame through the external interfaces' TC program (`lb_tc_ext`):
    /// (TC verdict, output frame).
    pub fn run_ext(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_frame(self.datapath.tc_ext(), frame, None).map_err(Into::into)
    }

    /// Runs one frame through the egress program (`lb_tc_egress`), as leaving towards a pod
    /// or the outside: (TC verdict, output frame).
    pub fn run_egress(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_frame(self.datapath.tc_egress(), frame, None).map_err(Into::into)
    }

    /// Runs one frame through the reject program beside XDP (`lb_tc_reject`):
    /// (TC verdict, output frame).
    pub fn run_reject(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_frame(self.datapath.reject(), frame, None).map_err(Into::into)
    }

    /// Runs one frame through `program` with BPF_PROG_TEST_RUN, leaving the output frame in
    /// `out` (its allocation reused, for loops of many frames): the verdict. The error is
    /// aya's, so that a caller can tell the kernel's refusal of a frame (`EINVAL`) apart.
    pub fn run_into(
        &self,
        program: Program,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u32, ProgramError> {
        out.clear();
        // Room for what a program may add (a reject's ICMP header grows the frame).
        out.resize(frame.len() + 256, 0);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(out.as_mut_slice());
        let r = match program {
            Program::Xdp => self.datapath.xdp().test_run(opts),
            Program::TcPod => self.datapath.tc_pod().test_run(opts),
            Program::TcExt => self.datapath.tc_ext().test_run(opts),
            Program::TcEgress => self.datapath.tc_egress().test_run(opts),
            Program::TcReject => self.datapath.reject().test_run(opts),
        }?;
        out.truncate(r.data_size_out as usize);
        Ok(r.return_value)
    }

    /// Runs one frame through a TC program (not `Program::Xdp`) as `run_into` does, the skb
    /// marked `CHECKSUM_COMPLETE` (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`): a rewrite that leaves
    /// the skb's sum wrong fails with `EBADMSG`, and nothing is copied out then. The bpf(2)
    /// call is made here because aya's `TestRunOptions` cannot set that flag.
    pub fn run_tc_complete(
        &self,
        program: Program,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> std::io::Result<u32> {
        use std::os::fd::{AsFd, AsRawFd};
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        let prog = match program {
            Program::Xdp => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            Program::TcPod => self.datapath.tc_pod(),
            Program::TcExt => self.datapath.tc_ext(),
            Program::TcEgress => self.datapath.tc_egress(),
            Program::TcReject => self.datapath.reject(),
        };
        let fd = prog
            .fd()
            .map_err(std::io::Error::other)?
            .as_fd()
            .as_raw_fd();
        out.clear();
        out.resize(frame.len() + 256, 0);
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given, its buffers live and
        // of the sizes given for the call; the kernel writes only `out` and `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.truncate(attr.data_size_out as usize);
        Ok(attr.retval)
    }
}

/// BPF_PROG_TEST_RUN's `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (include/uapi/linux/bpf.h): the skb
/// comes in with `CHECKSUM_COMPLETE` (its sum over the packet, as a NIC that checksums
/// everything hands it over), and the run fails with `EBADMSG` if the program left that sum
/// disagreeing with the packet. Not in aya's options: `run_tc_complete` makes the call.
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// The datapath's packet programs, for running frames through any of them in a loop
/// (`Harness::run_into`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// `lb_xdp` (`Harness::run`).
    Xdp,
    /// `lb_tc_pod` (`Harness::run_pod`).
    TcPod,
    /// `lb_tc_ext` (`Harness::run_ext`).
    TcExt,
    /// `lb_tc_egress` (`Harness::run_egress`).
    TcEgress,
    /// `lb_tc_reject` (`Harness::run_reject`).
    TcReject,
}

impl Program {
    pub const ALL: [Program; 5] = [
        Program::Xdp,
        Program::TcPod,
        Program::TcExt,
        Program::TcEgress,
        Program::TcReject,
    ];

    /// The program's name in the object file.
    pub fn name(self) -> &'static str {
        match self {
            Program::Xdp => program_names::LB_XDP,
            Program::TcPod => program_names::LB_TC_POD,
            Program::TcExt => program_names::LB_TC_EXT,
            Program::TcEgress => program_names::LB_TC_EGRESS,
            Program::TcReject => program_names::LB_TC_REJECT,
        }
    }

    /// The verdict with which the program passes a packet on: `XDP_PASS` or `TC_NEXT`.
    pub fn pass(self) -> u32 {
        if self == Program::Xdp {
            XDP_PASS
        } else {
            TC_NEXT
        }
    }
}

/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// TC verdicts. The datapath passes packets on with `TC_ACT_UNSPEC` (-1, tcx's "next"), so
/// that later programs on the hook still run.
pub const TC_NEXT: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
