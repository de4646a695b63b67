//! Finds where a key sits in a profile's text, for messages about checks that can only be made
//! after parsing (a missing `extends` target, a cycle, a key this kernel does not have) and for
//! showing which file and line asked for each setting.
//!
//! serde_yaml reports positions only for errors, never for values it parsed successfully, so
//! this scans block-style YAML by indentation. Profiles are small block mappings; for anything
//! it cannot follow (flow style) it returns None and callers fall back to the file alone.

/// Line and column (1-based) of the mapping key at `path`, e.g. `["sysctl", "net.core.somaxconn"]`.
/// `matches` decides whether a written key equals the wanted one, so callers can accept both
/// spellings of a sysctl key.
pub fn locate(
    text: &str,
    path: &[&str],
    matches: &dyn Fn(usize, &str) -> bool,
) -> Option<(usize, usize)> {
    let mut stack: Vec<(usize, bool)> = Vec::new(); // (indent, this level matched path so far)
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') || body.starts_with("---") {
            continue;
        }
        let indent = line.len() - body.len();
        let Some(key) = mapping_key(body) else {
            continue;
        };
        while stack.last().is_some_and(|&(i, _)| i >= indent) {
            stack.pop();
        }
        let depth = stack.len();
        let parent_ok = stack.iter().all(|&(_, ok)| ok);
        let ok = parent_ok && depth < path.len() && matches(depth, key);
        if ok && depth + 1 == path.len() {
            return Some((n + 1, indent + 1));
        }
        stack.push((indent, ok));
    }
    None
}

/// The key of a `key: value` or `key:` line, unquoted; None for list items and scalars.
fn mapping_key(body: &str) -> Option<&str> {
    if body.starts_with('-') || body.starts_with('{') || body.starts_with('[') {
        return None;
    }
    let (key, rest) = if let Some(q) = body.strip_prefix('"').or_else(|| body.strip_prefix('\'')) {
        let quote = body.as_bytes()[0] as char;
        let end = q.find(quote)?;
        (&q[..end], &q[end + 1..])
    } else {
        let colon = body
            .find(": ")
            .or_else(|| body.strip_suffix(':').map(|s| s.len()))?;
        (&body[..colon], &body[colon..])
    };
    rest.trim_start().starts_with(':').then_some(key.trim_end())
}

/// `locate` with plain string equality at every level.
pub fn locate_exact(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    locate(text, path, &|depth, key| key == path[depth])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# c100k\nextends: c10k\nsysctl:\n  # buffers\n  net.core.somaxconn: 65535\n  \"net/ipv4/tcp_rmem\": 1\nlimits:\n  nofile: 5\n";

    #[test]
    fn finds_top_level_and_nested_keys() {
        assert_eq!(locate_exact(TEXT, &["extends"]), Some((2, 1)));
        assert_eq!(
            locate_exact(TEXT, &["sysctl", "net.core.somaxconn"]),
            Some((5, 3))
        );
        assert_eq!(
            locate_exact(TEXT, &["sysctl", "net/ipv4/tcp_rmem"]),
            Some((6, 3))
        );
        assert_eq!(locate_exact(TEXT, &["limits", "nofile"]), Some((8, 3)));
        assert_eq!(locate_exact(TEXT, &["sysctl", "nofile"]), None);
        assert_eq!(locate_exact(TEXT, &["nofile"]), None);
    }

    #[test]
    fn flow_style_is_not_guessed() {
        assert_eq!(locate_exact("{extends: x}\n", &["extends"]), None);
    }
}
