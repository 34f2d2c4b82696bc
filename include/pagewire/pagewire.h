// pagewire: remote memory paging over userfaultfd.
#pragma once

#include "pagewire/error.h"
#include "pagewire/region.h"
#include "pagewire/server.h"
#include "pagewire/snapshot.h"
#include "pagewire/stats.h"
