// pagewire: remote memory paging over userfaultfd.
#pragma once

#include "pagewire/error.h"
#include "pagewire/region.h"
#include "pagewire/server.h"
#include "pagewire/stats.h"
