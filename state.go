package orchestrator

// State is an engine's lifecycle state.
type State string

// Engine states. A destroyed engine has no row, hence no state.
const (
	StateProvisioning State = "provisioning"
	StateRunning      State = "running"
	StateSleeping     State = "sleeping"
	StateStopped      State = "stopped"
	StateFailed       State = "failed"
	StateDestroying   State = "destroying"
)

// States lists every state, in lifecycle order.
var States = []State{StateProvisioning, StateRunning, StateSleeping, StateStopped, StateFailed, StateDestroying}

// Valid reports whether s is a known state.
func (s State) Valid() bool {
	_, ok := transitions[s]
	return ok
}

// transitions is the whole state machine: transitions[from] holds every
// state an engine may move to from `from`. Staying in the same state is
// always allowed (idempotent retries). Any state may go to destroying.
var transitions = map[State][]State{
	StateProvisioning: {StateRunning, StateFailed},
	StateRunning:      {StateSleeping, StateStopped, StateFailed},
	StateSleeping:     {StateRunning, StateStopped, StateFailed},
	StateStopped:      {StateRunning, StateFailed},
	StateFailed:       {StateRunning, StateStopped},
	StateDestroying:   {},
}

// CanTransition reports whether an engine in state from may move to to.
func CanTransition(from, to State) bool {
	if !from.Valid() || !to.Valid() {
		return false
	}
	if from == to || to == StateDestroying {
		return true
	}
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// Transitional reports whether s is a state an engine only passes through;
// every transitional state has a deadline.
func (s State) Transitional() bool {
	return s == StateProvisioning || s == StateDestroying
}
