//! A few dozen x86 instructions, encoded by hand, for tiny test guests.
//!
//! The guest is either in 32-bit protected mode (the PVH entry) or in 64-bit long mode (the
//! bzImage 64-bit entry); [`Asm::new`] takes the mode because absolute memory operands are
//! encoded differently (a plain disp32 in 32-bit mode is RIP-relative in 64-bit mode).

/// The CPU mode the code runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 32-bit protected mode.
    Protected32,
    /// 64-bit long mode.
    Long64,
}

/// A jump target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// Condition codes for [`Asm::jcc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Equal / zero.
    Eq = 0x4,
    /// Not equal / not zero.
    Ne = 0x5,
}

/// Emits machine code.
#[derive(Debug)]
pub struct Asm {
    mode: Mode,
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    /// An empty program for `mode`.
    pub fn new(mode: Mode) -> Self {
        Asm {
            mode,
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    /// Bytes emitted so far.
    pub fn len(&self) -> usize {
        self.code.len()
    }

    /// Whether nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }

    fn abs(&mut self, opcode: &[u8], reg: u8, addr: u32) -> &mut Self {
        self.bytes(opcode);
        match self.mode {
            // mod=00 rm=101: disp32.
            Mode::Protected32 => self.bytes(&[(reg << 3) | 0b101]),
            // mod=00 rm=100 + SIB(base=101 none, index=100 none): disp32, not RIP-relative.
            Mode::Long64 => self.bytes(&[(reg << 3) | 0b100, 0x25]),
        };
        self.bytes(&addr.to_le_bytes())
    }

    /// `mov dword [addr], imm`.
    pub fn store32(&mut self, addr: u32, imm: u32) -> &mut Self {
        self.abs(&[0xc7], 0, addr);
        self.bytes(&imm.to_le_bytes())
    }

    /// `mov word [addr], imm` (e.g. a virtqueue's avail index).
    pub fn store16(&mut self, addr: u32, imm: u16) -> &mut Self {
        self.abs(&[0x66, 0xc7], 0, addr);
        self.bytes(&imm.to_le_bytes())
    }

    /// `movzx eax, word [addr]` (e.g. a virtqueue's used index).
    pub fn load16_eax(&mut self, addr: u32) -> &mut Self {
        self.abs(&[0x0f, 0xb7], 0, addr)
    }

    /// `mov eax, dword [addr]`.
    pub fn load_eax(&mut self, addr: u32) -> &mut Self {
        self.abs(&[0x8b], 0, addr)
    }

    /// `mov dword [addr], eax`.
    pub fn store_eax(&mut self, addr: u32) -> &mut Self {
        self.abs(&[0x89], 0, addr)
    }

    /// `lidt [addr]`.
    pub fn lidt(&mut self, addr: u32) -> &mut Self {
        self.abs(&[0x0f, 0x01], 3, addr)
    }

    /// `mov eax, imm`.
    pub fn mov_eax(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0xb8]);
        self.bytes(&imm.to_le_bytes())
    }

    /// `mov al, imm`.
    pub fn mov_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0xb0, imm])
    }

    /// `out port, al` (any port; uses `dx` above 0xff).
    pub fn out_al(&mut self, port: u16) -> &mut Self {
        if port <= 0xff {
            self.bytes(&[0xe6, port as u8])
        } else {
            self.bytes(&[0x66, 0xba]);
            self.bytes(&port.to_le_bytes());
            self.bytes(&[0xee])
        }
    }

    /// `mov al, value; out port, al`.
    pub fn outb(&mut self, port: u16, value: u8) -> &mut Self {
        self.mov_al(value).out_al(port)
    }

    /// `cmp eax, imm`.
    pub fn cmp_eax(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0x3d]);
        self.bytes(&imm.to_le_bytes())
    }

    /// `test eax, imm`.
    pub fn test_eax(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0xa9]);
        self.bytes(&imm.to_le_bytes())
    }

    /// `cmp dword [ebx + disp], imm` (32-bit mode: `ebx` holds the PVH start info).
    pub fn cmp_ebx_mem(&mut self, disp: u32, imm: u32) -> &mut Self {
        // 81 /7 with mod=10 rm=011 (ebx + disp32).
        self.bytes(&[0x81, 0xbb]);
        self.bytes(&disp.to_le_bytes());
        self.bytes(&imm.to_le_bytes())
    }

    /// `cmp dword [rsi + disp], imm` (64-bit mode: `rsi` holds the zero page).
    pub fn cmp_rsi_mem(&mut self, disp: u32, imm: u32) -> &mut Self {
        // 81 /7 with mod=10 rm=110 (rsi + disp32).
        self.bytes(&[0x81, 0xbe]);
        self.bytes(&disp.to_le_bytes());
        self.bytes(&imm.to_le_bytes())
    }

    /// `cmp ebx, imm`.
    pub fn cmp_ebx(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0x81, 0xfb]);
        self.bytes(&imm.to_le_bytes())
    }

    /// `cmp esi, imm`.
    pub fn cmp_esi(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0x81, 0xfe]);
        self.bytes(&imm.to_le_bytes())
    }

    /// `in al, port` (port <= 0xff).
    pub fn in_al(&mut self, port: u8) -> &mut Self {
        self.bytes(&[0xe4, port])
    }

    /// `test al, imm`.
    pub fn test_al(&mut self, imm: u8) -> &mut Self {
        self.bytes(&[0xa8, imm])
    }

    /// `mov ecx, imm`.
    pub fn mov_ecx(&mut self, imm: u32) -> &mut Self {
        self.bytes(&[0xb9]);
        self.bytes(&imm.to_le_bytes())
    }

    /// `inc eax`.
    pub fn inc_eax(&mut self) -> &mut Self {
        self.bytes(&[0xff, 0xc0])
    }

    /// `dec ecx`.
    pub fn dec_ecx(&mut self) -> &mut Self {
        self.bytes(&[0xff, 0xc9])
    }

    /// `sti`.
    pub fn sti(&mut self) -> &mut Self {
        self.bytes(&[0xfb])
    }

    /// `cli`.
    pub fn cli(&mut self) -> &mut Self {
        self.bytes(&[0xfa])
    }

    /// `hlt`.
    pub fn hlt(&mut self) -> &mut Self {
        self.bytes(&[0xf4])
    }

    /// `int3`.
    pub fn int3(&mut self) -> &mut Self {
        self.bytes(&[0xcc])
    }

    /// `pause`.
    pub fn pause(&mut self) -> &mut Self {
        self.bytes(&[0xf3, 0x90])
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the current position.
    pub fn bind(&mut self, label: Label) -> &mut Self {
        self.labels[label.0] = Some(self.code.len());
        self
    }

    /// A new label bound here.
    pub fn here(&mut self) -> Label {
        let l = self.label();
        self.bind(l);
        l
    }

    /// `jcc rel32 label`.
    pub fn jcc(&mut self, cond: Cond, label: Label) -> &mut Self {
        self.bytes(&[0x0f, 0x80 | cond as u8, 0, 0, 0, 0]);
        self.fixups.push((self.code.len() - 4, label));
        self
    }

    /// `jmp rel32 label`.
    pub fn jmp(&mut self, label: Label) -> &mut Self {
        self.bytes(&[0xe9, 0, 0, 0, 0]);
        self.fixups.push((self.code.len() - 4, label));
        self
    }

    /// `hlt; jmp` back to it, forever: parks the vCPU without exiting to userspace.
    pub fn park(&mut self) -> &mut Self {
        let top = self.here();
        self.hlt().jmp(top)
    }

    /// The machine code, with jumps resolved.
    ///
    /// # Panics
    /// On an unbound label.
    pub fn finish(mut self) -> Vec<u8> {
        for &(at, label) in &self.fixups {
            let target = self.labels[label.0].expect("unbound label");
            let rel = (target as i64 - (at as i64 + 4)) as i32;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut a = Asm::new(Mode::Protected32);
        a.store32(0xd000_0070, 1)
            .load_eax(0xd000_0060)
            .outb(0xf4, 7);
        assert_eq!(
            a.finish(),
            [
                0xc7, 0x05, 0x70, 0, 0, 0xd0, 1, 0, 0, 0, // mov dword [0xd0000070], 1
                0x8b, 0x05, 0x60, 0, 0, 0xd0, // mov eax, [0xd0000060]
                0xb0, 7, 0xe6, 0xf4, // mov al, 7; out 0xf4, al
            ]
        );
        let mut a = Asm::new(Mode::Long64);
        a.store32(0x1000, 2)
            .cmp_rsi_mem(0x202, 0x5372_6448)
            .out_al(0x3f8);
        assert_eq!(
            a.finish(),
            [
                0xc7, 0x04, 0x25, 0, 0x10, 0, 0, 2, 0, 0, 0, // mov dword [abs 0x1000], 2
                0x81, 0xbe, 0x02, 0x02, 0, 0, 0x48, 0x64, 0x72,
                0x53, // cmp [rsi+0x202], 'HdrS'
                0x66, 0xba, 0xf8, 0x03, 0xee, // mov dx, 0x3f8; out dx, al
            ]
        );
    }

    #[test]
    fn sixteen_bit_accesses_and_test() {
        // Checked against GNU as (`movw $0x1234, 0x201002`; `movzwl 0x202002, %eax`).
        let mut a = Asm::new(Mode::Protected32);
        a.store16(0x20_1002, 0x1234)
            .load16_eax(0x20_2002)
            .test_eax(0x40);
        assert_eq!(
            a.finish(),
            [
                0x66, 0xc7, 0x05, 0x02, 0x10, 0x20, 0, 0x34,
                0x12, // mov word [0x201002], 0x1234
                0x0f, 0xb7, 0x05, 0x02, 0x20, 0x20, 0, // movzx eax, word [0x202002]
                0xa9, 0x40, 0, 0, 0, // test eax, 0x40
            ]
        );
        let mut a = Asm::new(Mode::Long64);
        a.store16(0x20_1002, 0x1234).load16_eax(0x20_2002);
        assert_eq!(
            a.finish(),
            [
                0x66, 0xc7, 0x04, 0x25, 0x02, 0x10, 0x20, 0, 0x34,
                0x12, // mov word [abs], imm16
                0x0f, 0xb7, 0x04, 0x25, 0x02, 0x20, 0x20, 0, // movzx eax, word [abs]
            ]
        );
    }

    #[test]
    fn jumps_resolve_both_ways() {
        let mut a = Asm::new(Mode::Protected32);
        let fwd = a.label();
        let back = a.here();
        a.jcc(Cond::Ne, fwd).jmp(back).bind(fwd).hlt();
        assert_eq!(
            a.finish(),
            [0x0f, 0x85, 5, 0, 0, 0, 0xe9, 0xf5, 0xff, 0xff, 0xff, 0xf4]
        );
    }
}
