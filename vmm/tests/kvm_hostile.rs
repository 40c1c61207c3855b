//! A hostile guest on real KVM. The vsock device is built exactly as the VMM builds it
//! (`build_vsock` with a host Unix socket and `uplink=none`) and sits behind the virtio-mmio
//! transport of a KVM VM; a tiny 32-bit guest drives it with real MMIO register writes and real
//! ioeventfd kicks. The queue memory (descriptors, packets, avail ring entries) is what a driver
//! would have written: the test prepares it in guest memory before boot or at one of the guest's
//! checkpoints (debug exits), and the guest publishes it by writing the avail index and kicking.
//!
//! After each hostile step the test checks that the vCPU stopped only at the expected debug exit,
//! that the device thread lives and did what `tests/hostile_queue.rs` and
//! `tests/hostile_protocol.rs` expect of the device (return the chain unanswered and count it,
//! answer with the RST the protocol prescribes, or refuse activation with DEVICE_NEEDS_RESET),
//! and then that a well-formed REQUEST still reaches the host listener at `<socket>_1234`, gets
//! its RESPONSE in the RX used ring, and that data sent after it arrives on the host stream.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kvm_available, wait_until, Scratch, SteppedVcpu};
use vm_memory::{Bytes, GuestAddress};
use vsock_router::wire::{op, sock_type, Header, HEADER_LEN};
use vsock_vmm::api::VsockControl;
use vsock_vmm::testkit::asm::{Asm, Cond, Label, Mode};
use vsock_vmm::testkit::images::elf_kernel;
use vsock_vmm::transport::registers::*;
use vsock_vmm::transport::MmioTransport;
use vsock_vmm::vm::layout::{self, DEBUG_EXIT_PORT};
use vsock_vmm::vm::vcpu::VcpuStop;
use vsock_vmm::vm::Vm;
use vsock_vmm::vsock::build_vsock;

const MEM: u64 = 64 << 20;
const LOAD: u32 = 0x10_0000;
const BASE: u32 = layout::MMIO_START as u32;
const QSIZE: u16 = 16;
const RXQ: u16 = 0;
const TXQ: u16 = 1;
/// Queue `q` lives at `QUEUE_AREA + q * 0x1_0000`: descriptors, avail ring at +0x1000, used
/// ring at +0x2000.
const QUEUE_AREA: u64 = 0x20_0000;
/// 4 KiB buffers: RX buffer `i` and TX packet slot `i`.
const RX_BUFS: u64 = 0x30_0000;
const TX_BUFS: u64 = 0x40_0000;
const BUF: u64 = 0x1000;
/// The hostile packet of a case, in TX slot 0.
const PKT: u64 = TX_BUFS;
/// TX descriptors (and slots) of the well-formed REQUEST and the RW after it.
const GOOD_SLOT: u16 = 8;
const HOST_PORT: u32 = 1234;
const GOOD_PORT: u32 = 50_000;
const HOSTILE_PORT: u32 = 40_000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const STATUS_OK: u32 = 0xf;
const DONE: u8 = 0x42;
/// Guest-side failures exit with `FAIL_BASE + n` (see [`Driver::fail_label`]).
const FAIL_BASE: u8 = 0xc0;
/// Iterations of a guest poll loop before it gives up: about 10 s on kvm_pvm (~2.5 µs each).
const POLL_LIMIT: u32 = 4_000_000;
/// How long the test waits for the guest's next stop or for a device effect.
const T: Duration = Duration::from_secs(60);
/// Counters a hostile guest can move; each case names the ones it must move, the rest stay 0.
const HOSTILE_COUNTERS: [&str; 10] = [
    "malformed_chains",
    "bad_len",
    "spoofed_src",
    "bad_type",
    "bad_op",
    "unknown_conn",
    "protocol_error",
    "credit_overrun",
    "bad_avail_idx",
    "rst_dropped",
];

fn desc_table(q: u16) -> u64 {
    QUEUE_AREA + u64::from(q) * 0x1_0000
}

fn avail_ring(q: u16) -> u64 {
    desc_table(q) + 0x1000
}

fn used_ring(q: u16) -> u64 {
    desc_table(q) + 0x2000
}

/// One split-ring descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn read_only(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    fn writable(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }

    fn then(mut self, next: u16) -> Self {
        self.flags |= F_NEXT;
        self.next = next;
        self
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A stream packet header from the guest `cid`.
fn packet(cid: u64, src_port: u32, dst_port: u32, op_: u16, len: u32) -> Header {
    Header {
        src_cid: cid,
        dst_cid: 2,
        src_port,
        dst_port,
        len,
        type_: sock_type::STREAM,
        op: op_,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// A REQUEST that would reach the host listener if the device accepted it.
fn hostile_request(cid: u64) -> Header {
    packet(cid, HOSTILE_PORT, HOST_PORT, op::REQUEST, 0)
}

/// The guest program: a virtio driver reduced to register writes, avail index stores, kicks,
/// bounded polls of used indexes and checkpoints.
struct Driver {
    a: Asm,
    fails: Vec<(Label, String)>,
}

impl Driver {
    fn new() -> Self {
        let mut a = Asm::new(Mode::Protected32);
        a.cli();
        Driver {
            a,
            fails: Vec::new(),
        }
    }

    fn reg(off: u64) -> u32 {
        BASE + off as u32
    }

    /// A label that exits with a failure code; `why` explains that code in the test's panic.
    fn fail_label(&mut self, why: String) -> Label {
        assert!(self.fails.len() < usize::from(0xff - FAIL_BASE));
        let l = self.a.label();
        self.fails.push((l, why));
        l
    }

    /// The handshake (features: VERSION_1 only), three queues of [`QSIZE`] entries at their
    /// places, DRIVER_OK. `quirk = (queue, register, value)` is written after that queue's
    /// regular setup, before QueueReady. Status must then read `expect_status`.
    fn init(&mut self, quirk: Option<(u16, u64, u32)>, expect_status: u32) {
        let a = &mut self.a;
        a.store32(Self::reg(REG_STATUS), STATUS_ACKNOWLEDGE);
        a.store32(Self::reg(REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        a.store32(Self::reg(REG_DRIVER_FEATURES_SEL), 1);
        a.store32(Self::reg(REG_DRIVER_FEATURES), 1);
        a.store32(Self::reg(REG_STATUS), 0xb);
        for q in 0..3u16 {
            a.store32(Self::reg(REG_QUEUE_SEL), u32::from(q));
            a.store32(Self::reg(REG_QUEUE_NUM), u32::from(QSIZE));
            a.store32(Self::reg(REG_QUEUE_DESC_LOW), desc_table(q) as u32);
            a.store32(Self::reg(REG_QUEUE_DESC_HIGH), 0);
            a.store32(Self::reg(REG_QUEUE_DRIVER_LOW), avail_ring(q) as u32);
            a.store32(Self::reg(REG_QUEUE_DRIVER_HIGH), 0);
            a.store32(Self::reg(REG_QUEUE_DEVICE_LOW), used_ring(q) as u32);
            a.store32(Self::reg(REG_QUEUE_DEVICE_HIGH), 0);
            if let Some((_, reg, value)) = quirk.filter(|&(qq, _, _)| qq == q) {
                a.store32(Self::reg(reg), value);
            }
            a.store32(Self::reg(REG_QUEUE_READY), 1);
        }
        a.store32(Self::reg(REG_STATUS), STATUS_OK);
        let fail = self.fail_label(format!("Status after DRIVER_OK is not {expect_status:#x}"));
        self.a
            .load_eax(Self::reg(REG_STATUS))
            .cmp_eax(expect_status)
            .jcc(Cond::Ne, fail);
    }

    /// Writes 0 to Status and checks that it reads 0.
    fn reset(&mut self) {
        let fail = self.fail_label("Status does not read 0 after a reset".into());
        self.a
            .store32(Self::reg(REG_STATUS), 0)
            .load_eax(Self::reg(REG_STATUS))
            .cmp_eax(0)
            .jcc(Cond::Ne, fail);
    }

    /// Zeroes the avail indexes of all queues (a driver starting over after a reset), no kick.
    fn clear_avail(&mut self) {
        for q in 0..3 {
            self.a.store16(avail_ring(q) as u32 + 2, 0);
        }
    }

    /// Makes the avail index of `q` read `idx`, then kicks `q` (QueueNotify → ioeventfd).
    fn publish(&mut self, q: u16, idx: u16) {
        self.a
            .store16(avail_ring(q) as u32 + 2, idx)
            .store32(Self::reg(REG_QUEUE_NOTIFY), u32::from(q));
    }

    /// Polls until the used index of `q` reads exactly `idx` (bounded by [`POLL_LIMIT`]).
    fn wait_used(&mut self, q: u16, idx: u16) {
        let fail = self.fail_label(format!("queue {q}: used index never read {idx}"));
        let a = &mut self.a;
        let ok = a.label();
        a.mov_ecx(POLL_LIMIT);
        let top = a.here();
        a.load16_eax(used_ring(q) as u32 + 2)
            .cmp_eax(u32::from(idx))
            .jcc(Cond::Eq, ok);
        a.pause().dec_ecx().jcc(Cond::Ne, top).jmp(fail);
        a.bind(ok);
    }

    /// Stops the vCPU with debug exit `n` until the test resumes it.
    fn checkpoint(&mut self, n: u8) {
        assert!(n != DONE && n < FAIL_BASE);
        self.a.outb(DEBUG_EXIT_PORT, n);
    }

    /// The well-formed tail (staged by [`Rig::stage_good`] at TX avail position `avail`):
    /// publish the REQUEST, wait for the answer in RX used slot `rx`, then send the RW and wait
    /// until both are back at TX used slots `used` and `used + 1`.
    fn good_tail(&mut self, avail: u16, used: u16, rx: u16) {
        self.publish(TXQ, avail + 1);
        self.wait_used(RXQ, rx + 1);
        self.publish(TXQ, avail + 2);
        self.wait_used(TXQ, used + 2);
    }

    /// Ends with debug exit [`DONE`]; returns the code and the meaning of each failure code.
    fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        self.a.outb(DEBUG_EXIT_PORT, DONE).park();
        let mut reasons = Vec::new();
        for (i, (label, why)) in self.fails.into_iter().enumerate() {
            self.a
                .bind(label)
                .outb(DEBUG_EXIT_PORT, FAIL_BASE + i as u8);
            self.a.park();
            reasons.push(why);
        }
        (self.a.finish(), reasons)
    }
}

/// One VM with the real vsock device, its host listener on port [`HOST_PORT`], and the guest.
struct Rig {
    // Declared first: dropped (vCPU stopped) before the VM.
    vcpu: Option<SteppedVcpu>,
    fails: Vec<String>,
    transport: Arc<Mutex<MmioTransport>>,
    control: Arc<dyn VsockControl>,
    vm: Vm,
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    scratch: Scratch,
}

impl Rig {
    /// `None` (after a loud SKIPPED line) without /dev/kvm. `cid` is unique per test so the
    /// device thread (`vsock-<cid>`) can be told apart from the other tests' in this process.
    fn new(test: &str, cid: u64) -> Option<Rig> {
        if !kvm_available(test) {
            return None;
        }
        let scratch = Scratch::new(test);
        let socket = scratch.path("vm.sock");
        let parts = build_vsock(&format!(
            "cid={cid},socket={},uplink=none",
            socket.display()
        ))
        .expect("build the vsock device");
        let mut port_path = socket.clone().into_os_string();
        port_path.push(format!("_{HOST_PORT}"));
        let listener = UnixListener::bind(&port_path).expect("bind the host listener");
        listener.set_nonblocking(true).unwrap();
        let mut vm = Vm::new(MEM).expect("create VM");
        let transport = vm.add_virtio(parts.device).expect("add the vsock device");
        Some(Rig {
            vcpu: None,
            fails: Vec::new(),
            transport,
            control: parts.control,
            vm,
            cid,
            socket,
            listener,
            scratch,
        })
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.vm
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .expect("guest memory write");
    }

    fn read<const N: usize>(&self, addr: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.vm
            .memory()
            .read_slice(&mut b, GuestAddress(addr))
            .expect("guest memory read");
        b
    }

    fn write_desc(&self, q: u16, slot: u16, d: Desc) {
        self.write(desc_table(q) + 16 * u64::from(slot), &d.bytes());
    }

    fn set_avail(&self, q: u16, pos: u16, head: u16) {
        self.write(avail_ring(q) + 4 + 2 * u64::from(pos), &head.to_le_bytes());
    }

    /// Writes `h` and `payload` into TX slot `slot`; returns the packet's length.
    fn write_tx_packet(&self, slot: u16, h: &Header, payload: &[u8]) -> u32 {
        let at = TX_BUFS + u64::from(slot) * BUF;
        self.write(at, &h.encode());
        self.write(at + HEADER_LEN as u64, payload);
        (HEADER_LEN + payload.len()) as u32
    }

    /// Posts `descs` as RX buffers: descriptor `i` at avail position `i`.
    fn post_rx(&self, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(RXQ, i as u16, *d);
            self.set_avail(RXQ, i as u16, i as u16);
        }
    }

    /// `n` good 4 KiB RX buffers.
    fn post_rx_buffers(&self, n: u16) {
        let descs: Vec<Desc> = (0..n)
            .map(|i| Desc::writable(RX_BUFS + u64::from(i) * BUF, BUF as u32))
            .collect();
        self.post_rx(&descs);
    }

    /// Stages the well-formed REQUEST (to host port [`HOST_PORT`] from [`GOOD_PORT`]) and an RW
    /// carrying `alive` at TX avail positions `pos` and `pos + 1`.
    fn stage_good(&self, pos: u16) {
        let req = packet(self.cid, GOOD_PORT, HOST_PORT, op::REQUEST, 0);
        let rw = packet(self.cid, GOOD_PORT, HOST_PORT, op::RW, 5);
        for (k, (h, payload)) in [(req, &b""[..]), (rw, &b"alive"[..])].iter().enumerate() {
            let slot = GOOD_SLOT + k as u16;
            let len = self.write_tx_packet(slot, h, payload);
            let addr = TX_BUFS + u64::from(slot) * BUF;
            self.write_desc(TXQ, slot, Desc::read_only(addr, len));
            self.set_avail(TXQ, pos + k as u16, slot);
        }
    }

    fn boot(&mut self, driver: Driver) {
        let (code, fails) = driver.finish();
        self.fails = fails;
        let kernel = self
            .scratch
            .write("kernel.elf", &elf_kernel(&code, LOAD, true));
        let info = self
            .vm
            .load_guest(
                &mut std::fs::File::open(kernel).unwrap(),
                None,
                "console=ttyS0",
                1,
            )
            .expect("load guest");
        let mut vcpus = self.vm.create_vcpus(1, &info.entry).expect("create vCPU");
        self.vcpu = Some(SteppedVcpu::start(vcpus.remove(0)));
    }

    /// Waits for the guest's next stop and checks that it is debug exit `code`.
    fn expect_stop(&self, code: u8) {
        let vcpu = self.vcpu.as_ref().expect("booted");
        let stop = vcpu.next_stop(T);
        if let Some(Ok(VcpuStop::DebugExit(c))) = stop {
            if c == code {
                return;
            }
            if let Some(why) = c
                .checked_sub(FAIL_BASE)
                .and_then(|i| self.fails.get(usize::from(i)))
            {
                panic!("guest failed ({c:#x}): {why}; {}", self.state());
            }
        }
        panic!(
            "expected debug exit {code:#x}, got {stop:?} (None: no stop within {T:?}); {}",
            self.state()
        );
    }

    fn resume(&self) {
        self.vcpu.as_ref().expect("booted").resume();
    }

    /// A summary for failure messages.
    fn state(&self) -> String {
        format!(
            "used idx rx {} tx {}, status {:#x}, counters {:?}",
            self.used_idx(RXQ),
            self.used_idx(TXQ),
            self.transport.lock().unwrap().status(),
            self.control.info().counters.errors
        )
    }

    fn used_idx(&self, q: u16) -> u16 {
        u16::from_le_bytes(self.read(used_ring(q) + 2))
    }

    /// Used element `i` of `q`: (descriptor head, length).
    fn used_elem(&self, q: u16, i: u16) -> (u32, u32) {
        let b: [u8; 8] = self.read(used_ring(q) + 4 + 8 * u64::from(i));
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// The packet header the device put in the RX buffer of used element `i`, and the used
    /// length.
    fn rx_answer(&self, i: u16) -> (Header, u32) {
        let (id, len) = self.used_elem(RXQ, i);
        let d: [u8; 8] = self.read(desc_table(RXQ) + 16 * u64::from(id));
        let hdr: [u8; HEADER_LEN] = self.read(u64::from_le_bytes(d));
        (Header::decode(&hdr), len)
    }

    fn counter(&self, name: &str) -> u64 {
        *self
            .control
            .info()
            .counters
            .errors
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Every counter in [`HOSTILE_COUNTERS`] reads its value in `expected`, or 0 if not listed.
    fn assert_counters(&self, expected: &[(&str, u64)]) {
        for name in HOSTILE_COUNTERS {
            let want = expected
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |&(_, v)| v);
            wait_until(Duration::from_secs(5), || self.counter(name) == want);
            assert_eq!(self.counter(name), want, "counter {name}; {}", self.state());
        }
        for (name, _) in expected {
            assert!(HOSTILE_COUNTERS.contains(name), "unchecked counter {name}");
        }
    }

    /// Whether the device thread (`vsock-<cid>`) exists.
    fn device_thread_alive(&self) -> bool {
        let want = format!("vsock-{}", self.cid);
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == want))
    }

    /// The device runs, its thread lives, Status is DRIVER_OK without DEVICE_NEEDS_RESET, and
    /// every kick went through the ioeventfd.
    fn assert_running(&self) {
        let t = self.transport.lock().unwrap();
        assert_eq!(t.status(), STATUS_OK, "no DEVICE_NEEDS_RESET");
        assert!(t.is_activated());
        assert_eq!(t.notify_exits(), 0, "kicks went through the ioeventfd");
        drop(t);
        // A new thread names itself once it runs: allow for that right after activation.
        assert!(
            wait_until(Duration::from_secs(5), || self.device_thread_alive()),
            "device thread vsock-{}",
            self.cid
        );
    }

    fn assert_no_host_connection(&self) {
        match self.listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the host listener got a connection: {other:?}"),
        }
    }

    /// Accepts the device's connection to the host listener (bounded).
    fn accept(&self) -> UnixStream {
        let mut got = None;
        wait_until(T, || match self.listener.accept() {
            Ok((s, _)) => {
                got = Some(s);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept: {e}"),
        });
        let s = got.expect("the device connected to the host listener");
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s
    }

    /// After [`Driver::good_tail`]`(_, tx, rx)`: the REQUEST got its RESPONSE in RX used slot
    /// `rx`, both TX chains came back at TX used slots `tx` and `tx + 1`, the host side accepted and received `alive`, the
    /// connection is listed (the device thread answers), and the device still runs.
    fn check_good(&self, tx: u16, rx: u16) {
        let (h, len) = self.rx_answer(rx);
        assert_eq!(len, HEADER_LEN as u32);
        assert_eq!(
            (h.op, h.type_, h.len, h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (
                op::RESPONSE,
                sock_type::STREAM,
                0,
                2,
                self.cid,
                HOST_PORT,
                GOOD_PORT
            ),
            "RESPONSE to the well-formed REQUEST: {h:?}"
        );
        assert_eq!(self.used_idx(RXQ), rx + 1, "nothing else was answered");
        assert_eq!(self.used_elem(TXQ, tx), (u32::from(GOOD_SLOT), 0));
        assert_eq!(self.used_elem(TXQ, tx + 1), (u32::from(GOOD_SLOT) + 1, 0));
        let mut s = self.accept();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).expect("data from the guest");
        assert_eq!(&b, b"alive");
        let conns = self.control.connections();
        assert!(
            conns.iter().any(|c| c.peer_cid == self.cid
                && c.peer_port == GOOD_PORT
                && c.local_port == HOST_PORT
                && c.state == "established"),
            "the connection is listed: {conns:?}"
        );
        self.assert_running();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.vcpu = None;
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }
}

/// What the device must do with the first TX chain of a case.
enum Answer {
    /// Return it (used length 0) and send nothing.
    Nothing,
    /// Return it and answer with `rst_reply()` of the packet.
    Rst,
}

/// A case whose first TX chain is hostile: `pkt` (with `payload`) sits in TX slot 0, `chain`
/// is written at descriptor slots 0.. (a single descriptor over the packet when empty) and
/// published first. At the checkpoint the chain must be back in the used ring with length 0,
/// `counters` moved, the answer be `answer`, no host connection made and the device running
/// without DEVICE_NEEDS_RESET; then the well-formed tail must work.
fn hostile_first_tx(
    test: &str,
    cid: u64,
    pkt: Header,
    payload: &[u8],
    chain: &[Desc],
    counters: &[(&str, u64)],
    answer: Answer,
) {
    let Some(mut rig) = Rig::new(test, cid) else {
        return;
    };
    rig.post_rx_buffers(4);
    let len = rig.write_tx_packet(0, &pkt, payload);
    if chain.is_empty() {
        rig.write_desc(TXQ, 0, Desc::read_only(PKT, len));
    }
    for (i, d) in chain.iter().enumerate() {
        rig.write_desc(TXQ, i as u16, *d);
    }
    rig.set_avail(TXQ, 0, 0);
    rig.stage_good(1);
    let answered = u16::from(matches!(answer, Answer::Rst));

    let mut d = Driver::new();
    d.init(None, STATUS_OK);
    d.publish(RXQ, 4);
    d.publish(TXQ, 1);
    d.wait_used(TXQ, 1);
    if answered == 1 {
        d.wait_used(RXQ, 1);
    }
    d.checkpoint(1);
    d.good_tail(1, 1, answered);
    rig.boot(d);

    rig.expect_stop(1);
    assert_eq!(
        rig.used_elem(TXQ, 0),
        (0, 0),
        "the chain came back with used length 0"
    );
    rig.assert_counters(counters);
    rig.assert_no_host_connection();
    rig.assert_running();
    match answer {
        Answer::Nothing => assert_eq!(rig.used_idx(RXQ), 0, "nothing answered"),
        Answer::Rst => {
            assert_eq!(
                rig.rx_answer(0),
                (pkt.rst_reply(), HEADER_LEN as u32),
                "the RST the protocol prescribes"
            );
        }
    }
    rig.resume();
    rig.expect_stop(DONE);
    rig.check_good(1, answered);
    rig.assert_counters(counters);
}

/// A TX chain the device must refuse as malformed (unanswered, counted, returned).
fn refused_chain(test: &str, cid: u64, chain: &[Desc]) {
    hostile_first_tx(
        test,
        cid,
        hostile_request(cid),
        &[],
        chain,
        &[("malformed_chains", 1)],
        Answer::Nothing,
    );
}

#[test]
fn tx_descriptor_loop_is_refused() {
    refused_chain(
        "tx_descriptor_loop_is_refused",
        101,
        &[
            Desc::read_only(PKT, 44).then(1),
            Desc::read_only(PKT + 0x100, 8).then(0),
        ],
    );
}

#[test]
fn tx_next_index_out_of_range_is_refused() {
    refused_chain(
        "tx_next_index_out_of_range_is_refused",
        102,
        &[Desc::read_only(PKT, 44).then(QSIZE)],
    );
}

#[test]
fn tx_buffer_past_the_end_of_guest_memory_is_refused() {
    refused_chain(
        "tx_buffer_past_the_end_of_guest_memory_is_refused",
        103,
        &[Desc::read_only(MEM - 20, 44)],
    );
}

#[test]
fn tx_buffer_wrapping_the_address_space_is_refused() {
    refused_chain(
        "tx_buffer_wrapping_the_address_space_is_refused",
        104,
        &[Desc::read_only(u64::MAX - 10, 44)],
    );
}

#[test]
fn tx_huge_descriptor_len_is_refused() {
    refused_chain(
        "tx_huge_descriptor_len_is_refused",
        105,
        &[Desc::read_only(PKT, u32::MAX)],
    );
}

#[test]
fn tx_write_only_descriptor_is_refused() {
    refused_chain(
        "tx_write_only_descriptor_is_refused",
        106,
        &[Desc::writable(PKT, 44)],
    );
}

/// The indirect table (placed in the packet slot right after the header) holds a valid
/// descriptor over the REQUEST: following it would connect to the host listener.
#[test]
fn tx_indirect_descriptor_is_not_followed() {
    let table = PKT + HEADER_LEN as u64;
    hostile_first_tx(
        "tx_indirect_descriptor_is_not_followed",
        107,
        hostile_request(107),
        &Desc::read_only(PKT, 44).bytes(),
        &[Desc {
            addr: table,
            len: 16,
            flags: F_INDIRECT,
            next: 0,
        }],
        &[("malformed_chains", 1)],
        Answer::Nothing,
    );
}

#[test]
fn tx_chain_of_empty_descriptors_is_refused() {
    refused_chain(
        "tx_chain_of_empty_descriptors_is_refused",
        108,
        &[Desc::read_only(PKT, 0).then(1), Desc::read_only(PKT, 0)],
    );
}

#[test]
fn tx_header_len_beyond_the_chain_is_refused() {
    let mut h = hostile_request(109);
    h.len = 1 << 20;
    hostile_first_tx(
        "tx_header_len_beyond_the_chain_is_refused",
        109,
        h,
        &[],
        &[],
        &[("malformed_chains", 1), ("bad_len", 1)],
        Answer::Nothing,
    );
}

#[test]
fn spoofed_src_cid_is_dropped_unanswered() {
    let mut h = hostile_request(110);
    h.src_cid = 99;
    hostile_first_tx(
        "spoofed_src_cid_is_dropped_unanswered",
        110,
        h,
        &[],
        &[],
        &[("spoofed_src", 1)],
        Answer::Nothing,
    );
}

#[test]
fn rw_for_an_unknown_connection_gets_rst() {
    hostile_first_tx(
        "rw_for_an_unknown_connection_gets_rst",
        111,
        packet(111, HOSTILE_PORT, HOST_PORT, op::RW, 3),
        b"bad",
        &[],
        &[("unknown_conn", 1)],
        Answer::Rst,
    );
}

#[test]
fn request_of_an_unknown_socket_type_gets_rst() {
    let mut h = hostile_request(112);
    h.type_ = 7;
    hostile_first_tx(
        "request_of_an_unknown_socket_type_gets_rst",
        112,
        h,
        &[],
        &[],
        &[("bad_type", 1)],
        Answer::Rst,
    );
}

/// The avail index jumps more than the queue size ahead: the device refuses the ring (counts
/// it, consumes nothing, keeps running, no DEVICE_NEEDS_RESET) until the driver repairs the index.
#[test]
fn avail_index_jumping_ahead_is_refused_until_repaired() {
    let Some(mut rig) = Rig::new("avail_index_jumping_ahead_is_refused_until_repaired", 113) else {
        return;
    };
    rig.post_rx_buffers(4);
    rig.stage_good(0);
    let mut d = Driver::new();
    d.init(None, STATUS_OK);
    d.publish(RXQ, 4);
    d.publish(TXQ, QSIZE + 1);
    d.checkpoint(1);
    // The repair: the index the driver meant, 0, kicked again; then the well-formed tail.
    d.publish(TXQ, 0);
    d.good_tail(0, 0, 0);
    rig.boot(d);

    rig.expect_stop(1);
    assert!(
        wait_until(T, || rig.counter("bad_avail_idx") >= 1),
        "the jump was seen; {}",
        rig.state()
    );
    // Once for the kick, and once more if the device's first pass after activation already
    // saw the bad index.
    let seen = rig.counter("bad_avail_idx");
    assert!(seen <= 2, "bad_avail_idx {seen}");
    assert_eq!(
        (rig.used_idx(TXQ), rig.used_idx(RXQ)),
        (0, 0),
        "nothing consumed"
    );
    rig.assert_counters(&[("bad_avail_idx", seen)]);
    rig.assert_no_host_connection();
    rig.assert_running();
    rig.resume();
    rig.expect_stop(DONE);
    rig.check_good(0, 0);
    rig.assert_counters(&[("bad_avail_idx", seen)]);
}

/// RX buffers the device cannot write a packet into (read-only, shorter than a header, outside
/// guest memory, a chain looping on itself) are returned with length 0 and counted; the answer goes to the next good one.
#[test]
fn rx_buffers_that_cannot_hold_a_packet_are_skipped() {
    let Some(mut rig) = Rig::new("rx_buffers_that_cannot_hold_a_packet_are_skipped", 114) else {
        return;
    };
    let mut bufs = vec![
        Desc::read_only(RX_BUFS, BUF as u32),
        Desc::writable(RX_BUFS + BUF, HEADER_LEN as u32 - 1),
        Desc::writable(MEM - 8, BUF as u32),
        Desc::writable(RX_BUFS + 3 * BUF, 64).then(3),
    ];
    bufs.extend((4..7).map(|i| Desc::writable(RX_BUFS + i * BUF, BUF as u32)));
    rig.post_rx(&bufs);
    rig.stage_good(0);
    let mut d = Driver::new();
    d.init(None, STATUS_OK);
    d.publish(RXQ, bufs.len() as u16);
    d.checkpoint(1);
    d.good_tail(0, 0, 4);
    rig.boot(d);

    rig.expect_stop(1);
    assert_eq!(
        rig.used_idx(RXQ),
        0,
        "no buffer is used before there is a packet"
    );
    rig.assert_running();
    rig.resume();
    rig.expect_stop(DONE);
    for i in 0..4 {
        assert_eq!(
            rig.used_elem(RXQ, i),
            (u32::from(i), 0),
            "bad RX buffer {i}"
        );
    }
    rig.check_good(0, 4);
    rig.assert_counters(&[("malformed_chains", 4)]);
}

/// A queue register the device cannot use: activation is refused, Status gets
/// DEVICE_NEEDS_RESET with a config-change interrupt and no device thread starts. The guest
/// resets the device, sets it up properly, and the well-formed tail works.
fn needs_reset_then_recovers(test: &str, cid: u64, quirk: (u16, u64, u32)) {
    let Some(mut rig) = Rig::new(test, cid) else {
        return;
    };
    rig.post_rx_buffers(4);
    rig.stage_good(0);
    // Memory at guest address 0 (where a queue whose address was refused would land).
    rig.write(0, &[0x5a; 64]);
    let mut d = Driver::new();
    d.init(Some(quirk), STATUS_OK | STATUS_DEVICE_NEEDS_RESET);
    // Kicks to a device that did not start go nowhere.
    d.publish(RXQ, 4);
    d.publish(TXQ, 1);
    d.checkpoint(1);
    d.reset();
    d.clear_avail();
    d.init(None, STATUS_OK);
    d.publish(RXQ, 4);
    d.good_tail(0, 0, 0);
    rig.boot(d);

    rig.expect_stop(1);
    {
        let t = rig.transport.lock().unwrap();
        assert_eq!(t.status(), STATUS_OK | STATUS_DEVICE_NEEDS_RESET);
        assert!(!t.is_activated());
        assert_eq!(
            t.interrupt().status() & INT_CONFIG_CHANGE,
            INT_CONFIG_CHANGE,
            "config-change interrupt"
        );
    }
    assert!(!rig.device_thread_alive(), "no device thread");
    assert_eq!((rig.used_idx(TXQ), rig.used_idx(RXQ)), (0, 0));
    rig.assert_no_host_connection();
    rig.resume();
    rig.expect_stop(DONE);
    rig.check_good(0, 0);
    rig.assert_counters(&[]);
    assert_eq!(rig.read::<64>(0), [0x5a; 64], "guest memory at 0 untouched");
}

#[test]
fn queue_outside_guest_memory_needs_reset() {
    needs_reset_then_recovers(
        "queue_outside_guest_memory_needs_reset",
        115,
        (TXQ, REG_QUEUE_DESC_HIGH, 1),
    );
}

#[test]
fn misaligned_used_ring_needs_reset() {
    needs_reset_then_recovers(
        "misaligned_used_ring_needs_reset",
        116,
        (TXQ, REG_QUEUE_DEVICE_LOW, used_ring(TXQ) as u32 + 2),
    );
}

#[test]
fn misaligned_descriptor_table_needs_reset() {
    needs_reset_then_recovers(
        "misaligned_descriptor_table_needs_reset",
        117,
        (RXQ, REG_QUEUE_DESC_LOW, desc_table(RXQ) as u32 + 8),
    );
}

#[test]
fn queue_size_not_a_power_of_two_needs_reset() {
    needs_reset_then_recovers(
        "queue_size_not_a_power_of_two_needs_reset",
        118,
        (TXQ, REG_QUEUE_NUM, 24),
    );
}

#[test]
fn queue_size_above_the_maximum_needs_reset() {
    // 0x1_0010 would be 16 if the transport kept only the low 16 bits.
    needs_reset_then_recovers(
        "queue_size_above_the_maximum_needs_reset",
        119,
        (RXQ, REG_QUEUE_NUM, 0x1_0010),
    );
}

/// A host client connects through `<socket>` with `CONNECT 5000`; the guest answers the
/// device's REQUEST with RW instead of RESPONSE. The protocol prescribes an RST to the guest,
/// and the host client is closed.
#[test]
fn rw_before_response_resets_the_host_connection() {
    let Some(mut rig) = Rig::new("rw_before_response_resets_the_host_connection", 120) else {
        return;
    };
    rig.post_rx_buffers(4);
    rig.set_avail(TXQ, 0, 0);
    rig.stage_good(1);
    let mut d = Driver::new();
    d.init(None, STATUS_OK);
    d.publish(RXQ, 4);
    d.checkpoint(1);
    d.wait_used(RXQ, 1);
    d.checkpoint(2);
    d.publish(TXQ, 1);
    d.wait_used(TXQ, 1);
    d.wait_used(RXQ, 2);
    d.checkpoint(3);
    d.good_tail(1, 1, 2);
    rig.boot(d);

    rig.expect_stop(1);
    let mut client = UnixStream::connect(&rig.socket).expect("connect to the hybrid socket");
    client.write_all(b"CONNECT 5000\n").unwrap();
    rig.resume();
    rig.expect_stop(2);
    let (req, _) = rig.rx_answer(0);
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port),
        (op::REQUEST, 2, 120, 5000),
        "the device offers the connection: {req:?}"
    );
    // The guest's (wrong) answer, written where the guest would write it.
    let rw = Header {
        src_cid: 120,
        dst_cid: 2,
        src_port: 5000,
        dst_port: req.src_port,
        ..packet(120, 0, 0, op::RW, 3)
    };
    let len = rig.write_tx_packet(0, &rw, b"bad");
    rig.write_desc(TXQ, 0, Desc::read_only(PKT, len));
    rig.resume();
    rig.expect_stop(3);
    let (rst, _) = rig.rx_answer(1);
    assert_eq!(
        (rst.op, rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port),
        (op::RST, 2, req.src_port, 120, 5000),
        "RST for the connection: {rst:?}"
    );
    assert_eq!(rig.used_elem(TXQ, 0), (0, 0));
    rig.assert_counters(&[("protocol_error", 1)]);
    client.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 16];
    match client.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the host client must be closed without data, got {other:?}"),
    }
    assert!(rig.control.connections().is_empty());
    rig.assert_running();
    rig.resume();
    rig.expect_stop(DONE);
    rig.check_good(1, 2);
    rig.assert_counters(&[("protocol_error", 1)]);
}

/// An avail ring entry naming a descriptor head beyond the table: the device refuses the chain
/// and cannot return a head that does not exist, so that entry never appears in the used ring;
/// the next chain is served normally.
#[test]
fn tx_head_index_out_of_range_is_consumed_unanswered() {
    let Some(mut rig) = Rig::new("tx_head_index_out_of_range_is_consumed_unanswered", 121) else {
        return;
    };
    rig.post_rx_buffers(4);
    rig.write_tx_packet(0, &hostile_request(121), &[]);
    rig.write_desc(TXQ, 0, Desc::read_only(PKT, HEADER_LEN as u32));
    rig.set_avail(TXQ, 0, QSIZE + 100);
    rig.stage_good(1);
    let mut d = Driver::new();
    d.init(None, STATUS_OK);
    d.publish(RXQ, 4);
    d.publish(TXQ, 1);
    d.checkpoint(1);
    d.good_tail(1, 0, 0);
    rig.boot(d);

    rig.expect_stop(1);
    rig.assert_counters(&[("malformed_chains", 1)]);
    assert_eq!(
        (rig.used_idx(TXQ), rig.used_idx(RXQ)),
        (0, 0),
        "nothing returned"
    );
    rig.assert_no_host_connection();
    rig.assert_running();
    rig.resume();
    rig.expect_stop(DONE);
    rig.check_good(0, 0);
    rig.assert_counters(&[("malformed_chains", 1)]);
}
