//! COM1: vm-superio's 16550A, its output copied to the VMM's console.

use std::io::Write;

use vm_superio::{Serial, Trigger};

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3F8;
/// Number of COM1 ports.
pub const COM1_PORTS: u16 = 8;

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
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(NoInterruptLine, out) }
    }

    /// Whether `port` belongs to COM1.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest `out` to a COM1 port.
    pub fn write(&mut self, port: u16, value: u8) {
        // The only error is the output's; a console that cannot be written
        // must not stop the guest.
        let _ = self.uart.write((port - COM1_BASE) as u8, value);
    }

    /// A guest `in` from a COM1 port.
    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    /// Flushes what the guest printed.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}
