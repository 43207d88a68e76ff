package api

func (s *Server) registerFleet() {}
