//! Adding files to an initramfs: Linux unpacks every newc cpio archive of a concatenation, so
//! appending a small archive to a copy of the inner guest's image puts extra files (the
//! `vr-socat` helper) into it without rebuilding the cached image.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// One newc member: a header, the NUL-terminated name and the data, each padded to 4 bytes.
fn member(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        0,                 // ino
        mode,              // mode
        0,                 // uid
        0,                 // gid
        1,                 // nlink
        0,                 // mtime
        data.len() as u32, // filesize
        0,                 // devmajor
        0,                 // devminor
        0,                 // rdevmajor
        0,                 // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// A newc archive holding `files` (guest path without the leading `/`, contents), each an
/// executable owned by root, with their parent directories; ends with the trailer.
pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dirs: Vec<&str> = Vec::new();
    for (path, _) in files {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let dir = &path[..at + i];
            if !dirs.contains(&dir) {
                dirs.push(dir);
                member(&mut out, dir, 0o040755, &[]);
            }
            at += i + 1;
        }
    }
    for (path, data) in files {
        member(&mut out, path, 0o100755, data);
    }
    member(&mut out, "TRAILER!!!", 0, &[]);
    out
}

/// Writes `base` followed by an archive of `files` to `out`.
pub(crate) fn extend_initramfs(base: &Path, files: &[(&str, &[u8])], out: &Path) -> io::Result<()> {
    std::fs::copy(base, out)?;
    let mut f = File::options().append(true).open(out)?;
    // The base archive ends padded to 4 bytes (GNU cpio pads to 512); keep the new one aligned.
    let len = f.metadata()?.len();
    let pad = (4 - len % 4) % 4;
    f.write_all(&vec![0; pad as usize])?;
    f.write_all(&archive(files))?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a newc archive back: (name, mode, data) per member.
    fn parse(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let start = a.len();
        loop {
            assert_eq!(&a[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap() as usize
            };
            let (mode, size, namesize) = (field(1) as u32, field(6), field(11));
            let name = String::from_utf8(a[110..110 + namesize - 1].to_vec()).unwrap();
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = a[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            a = &a[next..];
            assert_eq!((start - a.len()) % 4, 0);
            if name == "TRAILER!!!" {
                assert!(a.is_empty());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn archive_holds_the_files_and_their_directories() {
        let a = archive(&[("vr/bin/tool", b"#!/bin/sh\n"), ("vr/bin/two", b"x")]);
        let members = parse(&a);
        let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(names, ["vr", "vr/bin", "vr/bin/tool", "vr/bin/two"]);
        assert_eq!(members[0].1, 0o040755);
        assert_eq!(members[2].1, 0o100755);
        assert_eq!(members[2].2, b"#!/bin/sh\n");
        assert_eq!(members[3].2, b"x");
    }

    #[test]
    fn extended_image_is_the_base_then_the_new_archive() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.cpio");
        let base_bytes = archive(&[("init", b"base")]);
        std::fs::write(&base, &base_bytes[..base_bytes.len() - 2]).unwrap(); // unaligned end
        let out = dir.path().join("out.cpio");
        extend_initramfs(&base, &[("vr/bin/t", b"tool")], &out).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(
            &got[..base_bytes.len() - 2],
            &base_bytes[..base_bytes.len() - 2]
        );
        let tail = &got[base_bytes.len()..];
        assert_eq!(parse(tail).last().unwrap().2, b"tool");
    }
}
