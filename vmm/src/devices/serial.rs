//! The 8250 UART on COM1 (0x3f8, IRQ 4), from vm-superio, with an irqfd interrupt.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial IRQ by writing an [`EventFd`] registered with KVM as an irqfd on GSI 4.
#[derive(Debug)]
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The console UART.
pub type SerialDevice = Serial<IrqfdTrigger, NoEvents, Box<dyn Write + Send>>;

/// A UART writing the guest's output to `out`.
pub fn new_serial(irqfd: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
    Serial::new(IrqfdTrigger(irqfd), out)
}

/// A writer that discards everything (`--serial off`).
#[derive(Debug, Default)]
pub struct Discard;

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that flushes after every write, so a file or pipe sees output as the guest prints.
#[derive(Debug)]
pub struct Unbuffered<W: Write>(pub W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
