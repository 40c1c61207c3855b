//! virtio-mmio on real KVM with tiny 32-bit guests booted through the PVH path:
//! the guest drives the register file itself; kicks go through ioeventfds and interrupts
//! through the irqfd.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kvm_available, run_vcpu, Scratch};
use vsock_router::device::virtio::InterruptKind;
use vsock_router::sys::poll_one;
use vsock_vmm::testkit::asm::{Asm, Cond, Mode};
use vsock_vmm::testkit::device::{DeviceLog, RecordingDevice};
use vsock_vmm::testkit::images::elf_kernel;
use vsock_vmm::transport::registers::*;
use vsock_vmm::transport::MmioTransport;
use vsock_vmm::vm::layout::{self, DEBUG_EXIT_PORT};
use vsock_vmm::vm::vcpu::{Vcpu, VcpuStop};
use vsock_vmm::vm::Vm;

const LOAD: u32 = 0x10_0000;
const BASE: u32 = layout::MMIO_START as u32;
const DONE: u8 = 0x42;
const FAIL: u8 = 0xee;
const QUEUE_AREA: u32 = 0x20_0000;

/// Boots `code` (32-bit, PVH) in a 64 MiB VM with `device` at the first virtio-mmio slot.
fn boot(
    scratch: &Scratch,
    code: Vec<u8>,
    device: RecordingDevice,
) -> (Vm, Vcpu, Arc<Mutex<MmioTransport>>) {
    let kernel = scratch.write("kernel.elf", &elf_kernel(&code, LOAD, true));
    let mut vm = Vm::new(64 << 20).expect("create VM");
    let transport = vm.add_virtio(Box::new(device)).expect("add device");
    let info = vm
        .load_guest(&mut File::open(kernel).unwrap(), None, "console=ttyS0", 1)
        .expect("load guest");
    let mut vcpus = vm.create_vcpus(1, &info.entry).expect("create vCPU");
    (vm, vcpus.remove(0), transport)
}

/// The driver side of the handshake: status, features (VERSION_1), three queues, DRIVER_OK;
/// jumps to `fail` unless Status reads back 0xf.
fn activate(a: &mut Asm, fail: vsock_vmm::testkit::asm::Label) {
    let reg = |off: u64| BASE + off as u32;
    a.store32(reg(REG_STATUS), STATUS_ACKNOWLEDGE);
    a.store32(reg(REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    a.store32(reg(REG_DRIVER_FEATURES_SEL), 1);
    a.store32(reg(REG_DRIVER_FEATURES), 1);
    a.store32(reg(REG_STATUS), 0xb);
    for q in 0..3u32 {
        let area = QUEUE_AREA + q * 0x1_0000;
        a.store32(reg(REG_QUEUE_SEL), q);
        a.store32(reg(REG_QUEUE_NUM), 16);
        a.store32(reg(REG_QUEUE_DESC_LOW), area);
        a.store32(reg(REG_QUEUE_DESC_HIGH), 0);
        a.store32(reg(REG_QUEUE_DRIVER_LOW), area + 0x1000);
        a.store32(reg(REG_QUEUE_DEVICE_LOW), area + 0x2000);
        a.store32(reg(REG_QUEUE_READY), 1);
    }
    a.store32(reg(REG_STATUS), 0xf);
    a.load_eax(reg(REG_STATUS)).cmp_eax(0xf).jcc(Cond::Ne, fail);
}

fn assert_activated(log: &DeviceLog) {
    let act = log
        .last_activation()
        .expect("device activated by the guest");
    assert_eq!(act.kicks, 3);
    for (q, summary) in act.queues.iter().enumerate() {
        let area = u64::from(QUEUE_AREA) + q as u64 * 0x1_0000;
        assert_eq!(
            *summary,
            (16, true, area, area + 0x1000, area + 0x2000, false)
        );
    }
}

#[test]
fn queue_notify_hits_the_ioeventfd_without_a_userspace_exit() {
    if !kvm_available("queue_notify_hits_the_ioeventfd_without_a_userspace_exit") {
        return;
    }
    let scratch = Scratch::new("ioeventfd");
    let mut a = Asm::new(Mode::Protected32);
    let fail = a.label();
    activate(&mut a, fail);
    a.store32(BASE + REG_QUEUE_NOTIFY as u32, 1);
    a.store32(BASE + REG_QUEUE_NOTIFY as u32, 2);
    a.store32(BASE + REG_QUEUE_NOTIFY as u32, 2);
    a.outb(DEBUG_EXIT_PORT, DONE);
    a.bind(fail).outb(DEBUG_EXIT_PORT, FAIL);

    let device = RecordingDevice::new(&[256, 256, 64]);
    let log = device.log();
    let (_vm, vcpu, transport) = boot(&scratch, a.finish(), device);
    let stop = run_vcpu(vcpu, Duration::from_secs(60)).expect("guest runs");
    assert_eq!(stop, VcpuStop::DebugExit(DONE));
    assert_activated(&log);

    let t = transport.lock().unwrap();
    assert_eq!(
        t.notify_exits(),
        0,
        "QueueNotify reached userspace instead of the ioeventfd"
    );
    let kicks = log.kicks();
    assert_eq!(kicks[1].read().expect("queue 1 kicked"), 1);
    assert_eq!(kicks[2].read().expect("queue 2 kicked"), 2);
    assert!(kicks[0].read().is_err(), "queue 0 was not notified");
}

/// The guest cannot take interrupts on this machine's software KVM (kvm_pvm fails to emulate
/// IDT event delivery), so it watches the in-kernel 8259's Interrupt Request Register instead:
/// the irqfd raises IRQ 5 there, and IRR latches it while interrupts stay disabled.
#[test]
fn device_interrupt_reaches_the_guest_through_the_irqfd() {
    if !kvm_available("device_interrupt_reaches_the_guest_through_the_irqfd") {
        return;
    }
    let scratch = Scratch::new("irqfd");
    let irq_bit = 1u8 << layout::VIRTIO_IRQ_BASE;
    const SPURIOUS: u8 = 0xe1;
    const TIMEOUT: u8 = 0xe2;

    let mut a = Asm::new(Mode::Protected32);
    let fail = a.label();
    let spurious = a.label();
    let timeout = a.label();
    activate(&mut a, fail);
    // 8259 master: ICW1..ICW4 (vectors from 0x20), all lines masked; IF stays clear.
    a.cli();
    a.outb(0x20, 0x11)
        .outb(0x21, 0x20)
        .outb(0x21, 0x04)
        .outb(0x21, 0x01);
    a.outb(0x21, 0xff);
    // OCW3: reads of port 0x20 return IRR. Nothing may be pending before the kick.
    a.outb(0x20, 0x0a)
        .in_al(0x20)
        .test_al(irq_bit)
        .jcc(Cond::Ne, spurious);
    // Kick queue 0; the device thread answers with an interrupt through the irqfd.
    a.store32(BASE + REG_QUEUE_NOTIFY as u32, 0);
    a.mov_ecx(2_000_000);
    let poll = a.here();
    a.in_al(0x20).test_al(irq_bit);
    let seen = a.label();
    a.jcc(Cond::Ne, seen);
    a.pause().dec_ecx().jcc(Cond::Ne, poll);
    a.jmp(timeout);
    // IRQ 5 is pending: report InterruptStatus, after acknowledging it.
    a.bind(seen);
    a.load_eax(BASE + REG_INTERRUPT_STATUS as u32);
    a.store_eax(BASE + REG_INTERRUPT_ACK as u32);
    a.out_al(DEBUG_EXIT_PORT);
    a.bind(fail).outb(DEBUG_EXIT_PORT, FAIL);
    a.bind(spurious).outb(DEBUG_EXIT_PORT, SPURIOUS);
    a.bind(timeout).outb(DEBUG_EXIT_PORT, TIMEOUT);

    let device = RecordingDevice::new(&[256, 256, 64]).with_activate_hook(Box::new(|ctx| {
        let kick = ctx.kicks[0].try_clone().unwrap();
        let interrupt = ctx.interrupt.clone();
        std::thread::spawn(move || {
            let ready = poll_one(kick.as_raw_fd(), libc::POLLIN, 30_000).unwrap_or(0);
            if ready & libc::POLLIN != 0 && kick.read().is_ok() {
                interrupt.trigger(InterruptKind::UsedRing).unwrap();
            }
        });
    }));
    let (_vm, vcpu, transport) = boot(&scratch, a.finish(), device);
    let stop = run_vcpu(vcpu, Duration::from_secs(120)).expect("guest runs");
    assert_eq!(
        stop,
        VcpuStop::DebugExit(INT_USED_RING as u8),
        "expected the guest to see IRQ 5 pending and InterruptStatus = used ring \
         ({SPURIOUS:#x}: pending before the kick, {TIMEOUT:#x}: never raised)"
    );
    let t = transport.lock().unwrap();
    assert_eq!(
        t.interrupt().status(),
        0,
        "the guest acknowledged the interrupt"
    );
    assert_eq!(t.notify_exits(), 0);
}

#[test]
fn guest_reset_of_the_device_reaches_the_device() {
    if !kvm_available("guest_reset_of_the_device_reaches_the_device") {
        return;
    }
    let scratch = Scratch::new("reset");
    let mut a = Asm::new(Mode::Protected32);
    let fail = a.label();
    activate(&mut a, fail);
    a.store32(BASE + REG_STATUS as u32, 0);
    a.load_eax(BASE + REG_STATUS as u32)
        .cmp_eax(0)
        .jcc(Cond::Ne, fail);
    // The config space reads through to the device: guest_cid = 3.
    a.load_eax(BASE + REG_CONFIG as u32)
        .cmp_eax(3)
        .jcc(Cond::Ne, fail);
    a.load_eax(BASE + REG_MAGIC_VALUE as u32)
        .cmp_eax(MAGIC_VALUE)
        .jcc(Cond::Ne, fail);
    a.outb(DEBUG_EXIT_PORT, DONE);
    a.bind(fail).outb(DEBUG_EXIT_PORT, FAIL);
    let device = RecordingDevice::new(&[256, 256, 64]);
    let log = device.log();
    let (_vm, vcpu, _t) = boot(&scratch, a.finish(), device);
    assert_eq!(
        run_vcpu(vcpu, Duration::from_secs(60)).unwrap(),
        VcpuStop::DebugExit(DONE)
    );
    assert_eq!((log.activations(), log.resets()), (1, 1));
}
