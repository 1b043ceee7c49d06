//! COM1: vm-superio's 16550A, its output copied to the VMM's console.

use std::io::Write;

use vm_superio::{Serial, Trigger};

/// COM1's ports (guest-abi.md), defined once in `guest_images::abi`.
pub use guest_images::abi::{COM1_BASE, COM1_PORTS};

/// The guest has no interrupt controller (interrupts stay disabled, ABI v1),
/// so the UART's interrupt line goes nowhere.
#[derive(Debug)]
pub struct NoInterruptLine;

impl Trigger for NoInterruptLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The guest's console.
pub struct Console {
    uart: Serial<NoInterruptLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    /// The first error writing the output (the rest of it is lost).
    lost: Option<std::io::Error>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(NoInterruptLine, out), lost: None }
    }

    /// Whether `port` belongs to COM1.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest `out` to a COM1 port. A console that cannot be written
    /// does not stop the guest; the first error is kept ([`Self::lost`]).
    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(vm_superio::serial::Error::IOError(e)) = self.uart.write((port - COM1_BASE) as u8, value) {
            self.lost.get_or_insert(e);
        }
    }

    /// A guest `in` from a COM1 port.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    /// Flushes what the guest printed.
    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush() {
            self.lost.get_or_insert(e);
        }
    }

    /// Why some of the guest's console output could not be written, if it
    /// could not.
    pub fn lost(&self) -> Option<&std::io::Error> {
        self.lost.as_ref()
    }
}
