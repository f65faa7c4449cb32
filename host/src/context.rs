//! Values on the request context: set by workers through their `context`
//! import, read by later workers, by limits keyed `context:NAME` and by the
//! access log. A context lives for one request.

/// The maximum number of values on one request.
pub const MAX_VALUES: usize = 32;
/// The maximum name length, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// The maximum value length, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// The values workers set on one request, in the order first set. A request
/// carries a handful at most, so a vector is faster than a map here.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestContext {
    values: Vec<(String, String)>,
    /// How long the request's worker calls waited for their fetches: time
    /// spent in upstreams, not in the node. Workers do not see it.
    pub fetch_wait: std::time::Duration,
}

impl RequestContext {
    /// Returns the value set under `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Sets `name` to `value`, replacing an earlier value.
    ///
    /// # Errors
    ///
    /// Returns the rule that `name` or `value` breaks: see [`check_name`],
    /// [`MAX_VALUE_LEN`] and [`MAX_VALUES`].
    pub fn set(&mut self, name: String, value: String) -> Result<(), String> {
        check_name(&name)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(format!(
                "value of context {name:?} is {} bytes; the maximum is {MAX_VALUE_LEN}",
                value.len()
            ));
        }
        if let Some((_, old)) = self.values.iter_mut().find(|(key, _)| *key == name) {
            *old = value;
            return Ok(());
        }
        if self.values.len() >= MAX_VALUES {
            return Err(format!(
                "cannot set context {name:?}: the request already holds {MAX_VALUES} values"
            ));
        }
        self.values.push((name, value));
        Ok(())
    }

    /// Returns whether no worker has set a value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Returns the values in the order first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Checks a context name: 1 to [`MAX_NAME_LEN`] bytes of lower-case ASCII
/// letters, digits, `-`, `_` and `.`. The config checks the names of limit
/// keys with it too, so a limit cannot name a value no worker could set.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "context name {name:?} must be 1 to {MAX_NAME_LEN} bytes long"
        ));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
    if !name.bytes().all(allowed) {
        return Err(format!(
            "context name {name:?} may contain only lower-case letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_earlier_value() {
        let mut context = RequestContext::default();
        context.set("user".into(), "alice".into()).unwrap();
        context.set("user".into(), "bob".into()).unwrap();
        assert_eq!(context.get("user"), Some("bob"));
        assert_eq!(context.iter().count(), 1);
    }

    #[test]
    fn set_rejects_bad_names() {
        let mut context = RequestContext::default();
        for name in ["", "User", "a b", "x:y", &"n".repeat(MAX_NAME_LEN + 1)] {
            let result = context.set(name.to_owned(), "v".into());
            assert!(result.is_err(), "{name:?} was accepted");
        }
        assert!(context.is_empty());
    }

    #[test]
    fn set_rejects_long_values() {
        let mut context = RequestContext::default();
        let error = context
            .set("user".into(), "v".repeat(MAX_VALUE_LEN + 1))
            .unwrap_err();
        assert!(error.contains("maximum is 1024"), "{error}");
        assert!(context
            .set("user".into(), "v".repeat(MAX_VALUE_LEN))
            .is_ok());
    }

    #[test]
    fn set_stops_at_max_values() {
        let mut context = RequestContext::default();
        for index in 0..MAX_VALUES {
            context.set(format!("k{index}"), "v".into()).unwrap();
        }
        assert!(context.set("one-more".into(), "v".into()).is_err());
        // Replacing an existing value still works when full.
        assert!(context.set("k0".into(), "w".into()).is_ok());
    }
}
