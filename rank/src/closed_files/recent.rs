//! Paths in the order of their last close, with what the runtime knows of
//! each: past a cap the least recently closed is forgotten. Both tables of
//! closed files (appended logs, `mod.rs`; files of the node,
//! `node_files.rs`) keep theirs this way.

use std::collections::HashMap;

#[derive(Debug)]
struct Entry<T> {
    value: T,
    /// The order of its last close.
    last_close: u64,
}

/// A table of closed files, each with a `T`.
#[derive(Debug)]
pub(super) struct Recent<T> {
    entries: HashMap<String, Entry<T>>,
    closes: u64,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            entries: HashMap::new(),
            closes: 0,
        }
    }
}

impl<T: Default> Recent<T> {
    /// Marks `path` closed now: its entry (a new one holds `T::default()`)
    /// and whether another path was forgotten to keep at most `cap`.
    pub(super) fn closed(&mut self, path: String, cap: usize) -> (&mut T, bool) {
        let mut forgot = false;
        if !self.entries.contains_key(&path) && self.entries.len() >= cap.max(1) {
            let oldest = (self.entries.iter())
                .min_by_key(|(_, entry)| entry.last_close)
                .map(|(path, _)| path.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
                forgot = true;
            }
        }
        self.closes += 1;
        let entry = self.entries.entry(path).or_insert(Entry {
            value: T::default(),
            last_close: 0,
        });
        entry.last_close = self.closes;
        (&mut entry.value, forgot)
    }
}

impl<T> Recent<T> {
    /// Forgets `path`: what was known of it, if anything.
    pub(super) fn remove(&mut self, path: &str) -> Option<T> {
        self.entries.remove(path).map(|entry| entry.value)
    }

    /// Every path with what is known of it, in no order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.entries
            .iter()
            .map(|(path, entry)| (path, &entry.value))
    }

    /// [`Recent::iter`], to update what is known.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut T)> {
        (self.entries.iter_mut()).map(|(path, entry)| (path, &mut entry.value))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_closed_is_forgotten_past_the_cap() {
        let mut recent: Recent<u32> = Recent::default();
        *recent.closed("a".into(), 2).0 += 1;
        *recent.closed("b".into(), 2).0 += 1;
        // Closed again: now the most recent, and its value kept.
        let (a, forgot) = recent.closed("a".into(), 2);
        *a += 1;
        assert!(!forgot);
        let (_, forgot) = recent.closed("c".into(), 2);
        assert!(forgot, "b was the least recent");
        let mut left: Vec<_> = recent.iter().map(|(p, v)| (p.clone(), *v)).collect();
        left.sort();
        assert_eq!(left, [("a".to_owned(), 2), ("c".to_owned(), 0)]);
        assert_eq!(recent.remove("a"), Some(2));
        assert_eq!(recent.remove("a"), None);
    }
}
