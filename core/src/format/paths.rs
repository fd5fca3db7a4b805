//! The paths a store's metadata may record: a restart opens, makes and
//! changes into them, so none may lead out of where it was.

/// Whether `path` is absolute, has no `..` or `.` component and no NUL.
pub fn is_clean_absolute_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .skip(1)
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Whether `path` may be recorded as a rank's working directory: `/` or a
/// clean absolute path (a restart changes into it).
pub fn is_working_directory(path: &str) -> bool {
    path == "/" || is_clean_absolute_path(path)
}
