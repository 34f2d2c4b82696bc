// Moved to common/unique_fd.h, below both runtime/ and transport/; this
// forwarding header goes once nothing includes the old path.
#pragma once

#include "common/unique_fd.h"
