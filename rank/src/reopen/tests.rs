#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::opens::*;
use super::stdio::*;
use super::*;

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// The runtime's `open`, as a program calls it: the fd, or -1.
fn try_open(path: &Path, flags: c_int) -> c_int {
    // SAFETY: a NUL-terminated path and a mode, as for the C library's.
    unsafe { open(c(path).as_ptr(), flags, 0o644) }
}

fn opened(path: &Path, flags: c_int) -> c_int {
    let fd = try_open(path, flags);
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    fd
}

fn close_fd(fd: c_int) {
    // SAFETY: an fd this test opened and no longer uses.
    unsafe { libc::close(fd) };
}

fn fcntl_get(fd: c_int, cmd: c_int) -> c_int {
    // SAFETY: F_GETFL or F_GETFD only read the fd's flags.
    unsafe { libc::fcntl(fd, cmd) }
}

/// An fd open for writing on a new file holding `text`, at its end: what
/// a restart restored.
fn held(path: &Path, text: &str, flags: c_int) -> c_int {
    let fd = opened(path, flags | libc::O_CREAT);
    // SAFETY: writes `text` through an fd of this test.
    let written = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
    assert_eq!(written, isize::try_from(text.len()).unwrap());
    fd
}

// One test: the window and its offers are the process's.
#[test]
fn a_restarted_set_up_that_opens_its_output_again_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let fd = held(&log, "before the checkpoint\n", libc::O_WRONLY);
    offer_fds(0, [(fd, libc::O_WRONLY, "f".into())]);

    // fopen(path, "w") is given the restored fd, at its offset, uncut.
    // SAFETY: NUL-terminated path and mode.
    let stream = unsafe { fopen(c(&log).as_ptr(), c"w".as_ptr()) };
    assert!(!stream.is_null());
    // SAFETY: a stream fopen returned.
    assert_eq!(unsafe { libc::fileno(stream) }, fd);
    let line = b"after the restart\n";
    // SAFETY: writes `line` to the stream and flushes it.
    let (put, flushed) = unsafe {
        (
            libc::fwrite(line.as_ptr().cast(), 1, line.len(), stream),
            libc::fflush(stream),
        )
    };
    assert_eq!((put, flushed), (line.len(), 0));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before the checkpoint\nafter the restart\n"
    );
    // Given once: a second open is the C library's, which truncates.
    let again = opened(&log, libc::O_WRONLY | libc::O_TRUNC);
    assert_ne!(again, fd);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
    // SAFETY: the stream is this test's, used no more.
    unsafe { libc::fclose(stream) };
    close_fd(again);

    // Reads, O_EXCL, /proc paths, a wider access and another file are not
    // given it; open(O_APPEND | O_CLOEXEC) is, with those flags.
    let out = dir.path().join("out");
    let fd = held(&out, "12345", libc::O_WRONLY);
    offer_fds(0, [(fd, libc::O_WRONLY, "f".into())]);
    let other = dir.path().join("other");
    std::fs::write(&other, "x").unwrap();
    let through_proc = Path::new(&format!("/proc/self/fd/{fd}")).to_path_buf();
    for (path, flags) in [
        (&out, libc::O_RDONLY),
        (&out, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL),
        (&through_proc, libc::O_WRONLY),
        (&out, libc::O_RDWR),
        (&other, libc::O_WRONLY),
    ] {
        let got = try_open(path, flags);
        assert_ne!(got, fd, "{} with {flags:#x}", path.display());
        if got >= 0 {
            close_fd(got);
        }
    }
    let got = opened(
        &out,
        libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC | libc::O_TRUNC,
    );
    assert_eq!(got, fd);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "12345");
    assert_ne!(fcntl_get(fd, libc::F_GETFL) & libc::O_APPEND, 0);
    assert_eq!(fcntl_get(fd, libc::F_GETFD), libc::FD_CLOEXEC);
    close_fd(fd);

    // Closed by the set-up and its number reused for another file: not
    // given. Nor anything after the window closes.
    let gone = dir.path().join("gone");
    let fd = held(&gone, "old", libc::O_RDWR);
    offer_fds(0, [(fd, libc::O_RDWR, "f".into())]);
    close_fd(fd);
    let reused = opened(&other, libc::O_RDONLY);
    assert_eq!(reused, fd);
    let got = opened(&gone, libc::O_RDWR);
    assert_ne!(got, fd);
    close_fd(got);
    close_fd(reused);

    // freopen(path, "w", stream) continues the file at the restored fd's
    // offset, on the stream's own fd, and closes the restored one.
    let reopened = dir.path().join("reopened");
    let fd = held(&reopened, "one\ntwo\n", libc::O_WRONLY);
    // SAFETY: lseek on this test's fd: the checkpoint was taken after "one".
    unsafe { libc::lseek(fd, 4, libc::SEEK_SET) };
    offer_fds(0, [(fd, libc::O_WRONLY, "f".into())]);
    // SAFETY: NUL-terminated paths and modes; the stream is this test's.
    let stream = unsafe { fopen(c"/dev/null".as_ptr(), c"w".as_ptr()) };
    assert!(!stream.is_null());
    // SAFETY: as above.
    let stream = unsafe { freopen(c(&reopened).as_ptr(), c"w".as_ptr(), stream) };
    assert!(!stream.is_null(), "{}", std::io::Error::last_os_error());
    // SAFETY: the stream freopen returned.
    let on = unsafe { libc::fileno(stream) };
    assert_ne!(on, fd);
    // Closed: its number no longer holds the file (another test's thread
    // may have taken the number since).
    let file = identity(on);
    assert!(
        file.is_some() && identity(fd) != file,
        "the restored fd is closed"
    );
    assert_eq!(fcntl_get(on, libc::F_GETFL) & libc::O_APPEND, 0);
    let line = b"TWO\n";
    // SAFETY: writes `line` to the stream, flushes and closes it.
    unsafe {
        libc::fwrite(line.as_ptr().cast(), 1, line.len(), stream);
        libc::fclose(stream);
    }
    assert_eq!(std::fs::read_to_string(&reopened).unwrap(), "one\nTWO\n");

    let kept = dir.path().join("kept");
    let fd = held(&kept, "abc", libc::O_RDWR);
    offer_fds(0, [(fd, libc::O_RDWR, "f".into())]);
    // The fortified open (`_FORTIFY_SOURCE`) is given it as well.
    // SAFETY: a NUL-terminated path, as for the C library's.
    let fortified = unsafe { __open_2(c(&kept).as_ptr(), libc::O_RDWR | libc::O_TRUNC) };
    assert_eq!(fortified, fd);
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 3);
    close_window();
    let got = opened(&kept, libc::O_RDWR | libc::O_TRUNC);
    assert_ne!(got, fd);
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 0);
    close_fd(got);
    close_fd(fd);
}

#[test]
fn fopen_modes_become_open_flags() {
    let flags = |mode: &CStr| fopen_flags(mode.as_ptr());
    let (w, a) = (libc::O_WRONLY | libc::O_CREAT, libc::O_APPEND);
    assert_eq!(flags(c"w"), Some(w | libc::O_TRUNC));
    assert_eq!(
        flags(c"wb+"),
        Some(libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)
    );
    assert_eq!(flags(c"ae"), Some(w | a | libc::O_CLOEXEC));
    assert_eq!(flags(c"r"), Some(libc::O_RDONLY));
    assert_eq!(flags(c"r+"), Some(libc::O_RDWR));
    assert_eq!(flags(c"wx"), Some(w | libc::O_TRUNC | libc::O_EXCL));
    assert_eq!(flags(c"w,ccs=UTF-8+"), Some(w | libc::O_TRUNC));
    assert_eq!(flags(c"q"), None);
    assert_eq!(fopen_flags(std::ptr::null()), None);
    let appending = |mode: &CStr| appending_form(mode.as_ptr());
    assert_eq!(appending(c"w+b").as_deref(), Some(c"a+b"));
    assert_eq!(appending(c"we").as_deref(), Some(c"ae"));
    assert_eq!(appending(c"r+"), None);
    assert_eq!(appending_form(std::ptr::null()), None);
}

#[test]
fn a_file_the_set_up_cut_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cut, grown) = (dir.path().join("cut"), dir.path().join("grown"));
    let fd_cut = held(&cut, "0123456789", libc::O_WRONLY);
    let fd_grown = held(&grown, "0123", libc::O_WRONLY);
    let offers: Vec<Offer> = [(fd_cut, &cut), (fd_grown, &grown)]
        .into_iter()
        .map(|(fd, path)| Offer {
            fd,
            dev: identity(fd).unwrap().0,
            ino: identity(fd).unwrap().1,
            access: libc::O_WRONLY,
            size: std::fs::metadata(path).unwrap().len(),
            path: path.display().to_string(),
        })
        .collect();
    assert!(cut_by_set_up(&offers).is_empty());
    // A Fortran OPEN with status='replace', a Python open(path, "w").
    std::fs::File::create(&cut).unwrap();
    std::fs::write(&grown, "0123456789").unwrap();
    let lines = cut_by_set_up(&offers);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "{} (held open for writing at the checkpoint, 10 bytes) was cut to 0 bytes",
            cut.display()
        )),
        "{}",
        lines[0]
    );
    // Deleted and made again, as a rotated log is.
    std::fs::remove_file(&grown).unwrap();
    std::fs::write(&grown, "0123456789").unwrap();
    let lines = cut_by_set_up(&offers);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("4 bytes) was deleted or replaced by a new file"),
        "{}",
        lines[1]
    );
    close_fd(fd_cut);
    close_fd(fd_grown);
}
