// Status propagation helpers used across pdserve.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define PDS_STATUS_CONCAT_INNER(a, b) a##b
#define PDS_STATUS_CONCAT(a, b) PDS_STATUS_CONCAT_INNER(a, b)

// Returns from the current function if `expr` (an absl::Status) is not OK.
#define PDS_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::absl::Status pds_status_ = (expr);       \
    if (!pds_status_.ok()) return pds_status_; \
  } while (0)

// `lhs = value of expr` where expr is an absl::StatusOr<T>; returns its status on error.
#define PDS_ASSIGN_OR_RETURN(lhs, expr) \
  PDS_ASSIGN_OR_RETURN_IMPL(PDS_STATUS_CONCAT(pds_statusor_, __COUNTER__), lhs, expr)

#define PDS_ASSIGN_OR_RETURN_IMPL(statusor, lhs, expr)     \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
