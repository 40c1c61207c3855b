//! Minimal bootable kernel images wrapping a few bytes of test code.

/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point note type.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const CODE_OFFSET: usize = 0x1000;

/// An ELF64 x86_64 executable with one `PT_LOAD` segment holding `code` at physical address
/// `load_addr`. With `pvh`, a `PT_NOTE` segment carries a Xen `PHYS32_ENTRY` note pointing at
/// `load_addr`, so the VMM starts the code in 32-bit protected mode (PVH); without it, the VMM
/// uses the ELF entry (`load_addr`) in 64-bit long mode.
pub fn elf_kernel(code: &[u8], load_addr: u32, pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let note_offset = EHDR_SIZE + PHDR_SIZE * phnum as usize;
    let mut note = Vec::new();
    if pvh {
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&load_addr.to_le_bytes());
    }
    assert!(note_offset + note.len() <= CODE_OFFSET);

    let mut out = Vec::with_capacity(CODE_OFFSET + code.len());
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&u64::from(load_addr).to_le_bytes()); // e_entry
    out.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    out.extend_from_slice(&phnum.to_le_bytes()); // e_phnum
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx

    let mut phdr = |p_type: u32, flags: u32, offset: usize, addr: u64, size: usize, align: u64| {
        out.extend_from_slice(&p_type.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        out.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        out.extend_from_slice(&(size as u64).to_le_bytes()); // p_filesz
        out.extend_from_slice(&(size as u64).to_le_bytes()); // p_memsz
        out.extend_from_slice(&align.to_le_bytes());
    };
    phdr(1, 5, CODE_OFFSET, u64::from(load_addr), code.len(), 0x1000); // PT_LOAD, R+X
    if pvh {
        phdr(4, 4, note_offset, 0, note.len(), 4); // PT_NOTE
    }
    out.extend_from_slice(&note);
    out.resize(CODE_OFFSET, 0);
    out.extend_from_slice(code);
    out
}

/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
pub const BZIMAGE_ENTRY64_OFFSET: usize = 0x200;

/// A bzImage (boot protocol 2.15) whose protected-mode kernel, loaded at 1 MiB, holds `code64`
/// at its 64-bit entry (offset 0x200); the 32-bit entry at offset 0 is `hlt`s.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    const SETUP_SECTS: u8 = 1;
    let setup_size = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut out = vec![0u8; setup_size];
    out[0x1f1] = SETUP_SECTS;
    out[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    out[0x202..0x206].copy_from_slice(b"HdrS"); // header
    out[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version 2.15
    out[0x211] = 0x01; // loadflags: LOADED_HIGH
    out[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    out[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    out[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    out[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    out[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes()); // cmdline_size
    let mut kernel = vec![0xf4u8; BZIMAGE_ENTRY64_OFFSET];
    kernel.extend_from_slice(code64);
    out.extend_from_slice(&kernel);
    out
}
