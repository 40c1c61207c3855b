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

/// A writer that writes whole lines: the guest's output is held until its `\n` (or until
/// [`LINE_MAX`] bytes wait, or the writer is flushed or dropped). Where the guest's console and
/// the VMM's log share one file (`>vm.log 2>&1`), a log line then never lands in the middle of
/// a console line, which the guest prints a byte at a time.
#[derive(Debug)]
pub struct LineBuffered<W: Write> {
    out: W,
    line: Vec<u8>,
}

/// Most bytes a [`LineBuffered`] holds before it writes them without a `\n`.
pub const LINE_MAX: usize = 4096;

impl<W: Write> LineBuffered<W> {
    /// Whole lines to `out`.
    pub fn new(out: W) -> Self {
        LineBuffered {
            out,
            line: Vec::with_capacity(LINE_MAX),
        }
    }

    fn write_held(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.out.write_all(&self.line)?;
            self.line.clear();
        }
        self.out.flush()
    }
}

impl<W: Write> Write for LineBuffered<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= LINE_MAX {
            self.write_held()?;
        }
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte: a partial line stays held (only the end of the
    /// line, the limit or the drop writes it), or the buffering would do nothing.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> Drop for LineBuffered<W> {
    fn drop(&mut self) {
        let _ = self.write_held();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared byte sink, to look at what reached it so far.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn whole_lines_only_until_a_newline_or_the_limit_or_the_end() {
        let sink = Sink::default();
        let mut w = LineBuffered::new(sink.clone());
        for b in b"VRTEST-DON" {
            w.write_all(&[*b]).unwrap();
            w.flush().unwrap();
        }
        assert!(sink.0.lock().unwrap().is_empty(), "a partial line waits");
        w.write_all(b"E rc=0\nnext").unwrap();
        assert_eq!(&sink.0.lock().unwrap()[..], b"VRTEST-DONE rc=0\nnext");
        w.write_all(&vec![b'x'; LINE_MAX]).unwrap();
        assert_eq!(
            sink.0.lock().unwrap().len(),
            21 + LINE_MAX,
            "no more than the limit waits"
        );
        w.write_all(b"tail").unwrap();
        drop(w);
        assert!(
            sink.0.lock().unwrap().ends_with(b"tail"),
            "written when dropped"
        );
    }
}
