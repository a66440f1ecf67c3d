//! Precise gRPC statuses for user-facing errors. INVALID_ARGUMENT carries the offending field
//! path in the message and as a `google.rpc.BadRequest` field violation, so clients can point
//! at the field programmatically.

use tonic_types::{ErrorDetails, StatusExt};

/// INVALID_ARGUMENT naming `field` (a path such as `identifiers.identifiers[2].value`).
pub fn invalid_field(field: &str, description: impl Into<String>) -> tonic::Status {
    let description = description.into();
    let details = ErrorDetails::with_bad_request_violation(field, description.clone());
    tonic::Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {description}"),
        details,
    )
}

/// NOT_FOUND naming the kind and id of what is missing.
pub fn not_found(kind: &str, id: &str) -> tonic::Status {
    tonic::Status::not_found(format!("{kind} `{id}` not found"))
}

/// The field path of a violation carried by `status`, if any (for tests and clients).
pub fn violated_field(status: &tonic::Status) -> Option<String> {
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_field_names_the_field_in_message_and_details() {
        let s = invalid_field("identifiers[0].value", "must not be empty");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("identifiers[0].value"));
        assert_eq!(violated_field(&s).as_deref(), Some("identifiers[0].value"));
    }
}
