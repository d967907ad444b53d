//! The named errors of the interface, for the daemon (as replies) and clients (as
//! results of proxy calls).
use crate::{ERROR_ACCESS_DENIED, ERROR_FAILED, ERROR_INVALID_ARGUMENT, ERROR_INVALID_CONFIG, ERROR_NOT_ATTACHED};
use std::fmt;
use zbus::{
    message::{Header, Message},
    names::ErrorName,
};

/// Errors of `org.bypassd.Manager1` calls. The string is the readable message the
/// daemon sent; [`Error::Bus`] is everything else (no bus, no daemon, bus policy
/// refusal, wrong signature, ...).
#[derive(Debug)]
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
    Bus(zbus::Error),
}

impl Error {
    /// The D-Bus error name, when there is one.
    pub fn name(&self) -> Option<String> {
        match self {
            Error::Bus(e) => bus_error_name(e),
            other => Some(other.own_name().to_string()),
        }
    }

    /// The readable message without the error name.
    pub fn message(&self) -> String {
        match self {
            Error::InvalidArgument(m)
            | Error::AccessDenied(m)
            | Error::InvalidConfig(m)
            | Error::NotAttached(m)
            | Error::Failed(m) => m.clone(),
            Error::Bus(zbus::Error::MethodError(_, Some(m), _)) => m.clone(),
            Error::Bus(zbus::Error::FDO(e)) => zbus::DBusError::description(e.as_ref()).unwrap_or_default().to_string(),
            Error::Bus(e) => e.to_string(),
        }
    }

    fn own_name(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => ERROR_INVALID_ARGUMENT,
            Error::AccessDenied(_) => ERROR_ACCESS_DENIED,
            Error::InvalidConfig(_) => ERROR_INVALID_CONFIG,
            Error::NotAttached(_) => ERROR_NOT_ATTACHED,
            Error::Failed(_) | Error::Bus(_) => ERROR_FAILED,
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
            other => write!(f, "{}: {}", other.own_name(), other.message()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bus(e) => Some(e),
            _ => None,
        }
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Self {
        let (name, desc) = match &e {
            zbus::Error::MethodError(name, desc, _) => (name.to_string(), desc.clone().unwrap_or_default()),
            _ => return Error::Bus(e),
        };
        match name.as_str() {
            ERROR_INVALID_ARGUMENT => Error::InvalidArgument(desc),
            ERROR_ACCESS_DENIED => Error::AccessDenied(desc),
            ERROR_INVALID_CONFIG => Error::InvalidConfig(desc),
            ERROR_NOT_ATTACHED => Error::NotAttached(desc),
            ERROR_FAILED => Error::Failed(desc),
            _ => Error::Bus(e),
        }
    }
}

impl zbus::DBusError for Error {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name_ref())?.build(&(self.message(),))
    }

    fn name(&self) -> ErrorName<'_> {
        self.name_ref()
    }

    fn description(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument(m)
            | Error::AccessDenied(m)
            | Error::InvalidConfig(m)
            | Error::NotAttached(m)
            | Error::Failed(m) => Some(m),
            Error::Bus(_) => None,
        }
    }
}

impl Error {
    fn name_ref(&self) -> ErrorName<'static> {
        ErrorName::from_static_str_unchecked(self.own_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_errors_map_to_variants_by_name() {
        let e = zbus::Error::MethodError(
            ErrorName::try_from(ERROR_INVALID_ARGUMENT).unwrap().into(),
            Some("rule 1: bad".into()),
            Message::method_call("/", "X").unwrap().build(&()).unwrap(),
        );
        let e = Error::from(e);
        assert!(matches!(&e, Error::InvalidArgument(m) if m == "rule 1: bad"), "{e:?}");
        assert_eq!(e.name().as_deref(), Some(ERROR_INVALID_ARGUMENT));
        assert_eq!(e.to_string(), "org.bypassd.Error.InvalidArgument: rule 1: bad");
        let other = zbus::Error::MethodError(
            ErrorName::try_from("org.freedesktop.DBus.Error.ServiceUnknown").unwrap().into(),
            Some("gone".into()),
            Message::method_call("/", "X").unwrap().build(&()).unwrap(),
        );
        let other = Error::from(other);
        assert!(matches!(other, Error::Bus(_)));
        assert_eq!(other.name().as_deref(), Some("org.freedesktop.DBus.Error.ServiceUnknown"));
        assert_eq!(other.message(), "gone");
    }
}
