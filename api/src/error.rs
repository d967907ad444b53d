//! The named errors of the interface, for the daemon (as replies) and clients (as
//! results of proxy calls).
use std::fmt;

/// Errors of `org.bypassd.Manager1` calls. The string is the readable message the
/// daemon sent; [`Error::Bus`] is everything else (no bus, no daemon, bus policy
/// refusal, wrong signature, ...). The derive names each variant
/// `org.bypassd.Error.<Variant>` (see [`crate::ERROR_NAMES`]), builds the replies and
/// maps replies back to variants by name.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bypassd.Error", impl_display = false)]
pub enum Error {
    /// `org.bypassd.Error.InvalidArgument`
    InvalidArgument(String),
    /// `org.bypassd.Error.AccessDenied`
    AccessDenied(String),
    /// `org.bypassd.Error.InvalidConfig`
    InvalidConfig(String),
    /// `org.bypassd.Error.NotAttached`
    NotAttached(String),
    /// `org.bypassd.Error.Failed`
    Failed(String),
    /// Not one of ours: transport errors and other services' named errors.
    #[zbus(error)]
    Bus(zbus::Error),
}

impl Error {
    /// The D-Bus error name, when there is one (for [`Error::Bus`], the name of the
    /// other service's error reply).
    pub fn error_name(&self) -> Option<String> {
        match self {
            Error::Bus(e) => bus_error_name(e),
            other => Some(zbus::DBusError::name(other).to_string()),
        }
    }

    /// The readable message without the error name.
    pub fn message(&self) -> String {
        match self {
            Error::Bus(zbus::Error::MethodError(_, Some(m), _)) => m.clone(),
            Error::Bus(zbus::Error::FDO(e)) => zbus::DBusError::description(e.as_ref()).unwrap_or_default().to_string(),
            Error::Bus(e) => e.to_string(),
            other => zbus::DBusError::description(other).unwrap_or_default().to_string(),
        }
    }
}

/// The error name of a zbus error that carries one (a method error reply).
pub fn bus_error_name(e: &zbus::Error) -> Option<String> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        zbus::Error::FDO(e) => Some(zbus::DBusError::name(e.as_ref()).to_string()),
        _ => None,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "{e}"),
            other => write!(f, "{}: {}", zbus::DBusError::name(other), other.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ERROR_INVALID_ARGUMENT, ERROR_NAMES};
    use zbus::{message::Message, names::ErrorName};

    /// The derive's names are the documented ones (bypassctl and the bus policy use them).
    #[test]
    fn variants_carry_the_documented_names() {
        let all = [
            Error::InvalidArgument(String::new()),
            Error::AccessDenied(String::new()),
            Error::InvalidConfig(String::new()),
            Error::NotAttached(String::new()),
            Error::Failed(String::new()),
        ];
        let names: Vec<String> = all.iter().filter_map(Error::error_name).collect();
        assert_eq!(names, ERROR_NAMES);
    }

    #[test]
    fn method_errors_map_to_variants_by_name() {
        let e = zbus::Error::MethodError(
            ErrorName::try_from(ERROR_INVALID_ARGUMENT).unwrap().into(),
            Some("rule 1: bad".into()),
            Message::method_call("/", "X").unwrap().build(&()).unwrap(),
        );
        let e = Error::from(e);
        assert!(matches!(&e, Error::InvalidArgument(m) if m == "rule 1: bad"), "{e:?}");
        assert_eq!(e.error_name().as_deref(), Some(ERROR_INVALID_ARGUMENT));
        assert_eq!(e.to_string(), "org.bypassd.Error.InvalidArgument: rule 1: bad");
        let other = zbus::Error::MethodError(
            ErrorName::try_from("org.freedesktop.DBus.Error.ServiceUnknown").unwrap().into(),
            Some("gone".into()),
            Message::method_call("/", "X").unwrap().build(&()).unwrap(),
        );
        let other = Error::from(other);
        assert!(matches!(other, Error::Bus(_)));
        assert_eq!(other.error_name().as_deref(), Some("org.freedesktop.DBus.Error.ServiceUnknown"));
        assert_eq!(other.message(), "gone");
    }
}
