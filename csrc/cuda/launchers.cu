#include "../launchers.h"
