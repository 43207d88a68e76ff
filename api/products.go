package api

func (s *Server) registerProducts() {}
